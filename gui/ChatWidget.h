// ChatWidget: the conversation. Streams tokens from the EngineController, keeps the messages
// (saved and reopened as JSON), sampling settings, stop / regenerate / continue / edit, a
// context meter and per-answer speed figures. Every generated token is a link: clicking it
// selects that position in the TelemetryStore, so every view follows. Text can be coloured by
// the top expert of a chosen layer, by MTP drafted/accepted, or by surprisal.
#pragma once
#include <QJsonObject>
#include <QTimer>
#include <QWidget>

#include <optional>
#include <vector>

#include "EngineController.h"

class QCheckBox;
class QComboBox;
class QDoubleSpinBox;
class QLabel;
class QPlainTextEdit;
class QProgressBar;
class QPushButton;
class QSpinBox;
class QTextBrowser;
class TelemetryStore;

struct ChatEntry {
    QString role;                      // system | user | assistant
    QString text;                      // what the user typed / the decoded answer
    std::vector<GeneratedToken> tokens;  // assistant: every generated token
    std::optional<GenerationSummary> summary;
};

class ChatWidget : public QWidget {
    Q_OBJECT
public:
    enum class Colouring { None, TopExpert, Mtp, Surprisal };
    ChatWidget(EngineController* engine, TelemetryStore* store, QWidget* parent = nullptr);

    // Actions (also bound to buttons and shortcuts).
    bool send(const QString& text);    // false (and a message in the status line) when it cannot
    void stop();
    void regenerate();
    void continueGeneration();
    void editLast();                   // the last user message back into the input; drops the turn
    void newConversation();
    bool saveConversation(const QString& path, QString* error = nullptr) const;
    bool openConversation(const QString& path, QString* error = nullptr);

    const std::vector<ChatEntry>& entries() const { return m_entries; }
    QTextBrowser* browser() const { return m_view; }
    QPlainTextEdit* input() const { return m_input; }
    void setColouring(Colouring c, int layer = -1);
    void setSystemPrompt(const QString& s);
    void setStopAtEos(bool on);
    moescope::SamplingParams sampling() const;
    void setSampling(const moescope::SamplingParams& p);
    QJsonObject settingsJson() const;
    void applySettingsJson(const QJsonObject& o);
    QString statusText() const;

signals:
    void statusMessage(const QString& text);

private:
    void startGeneration(const std::vector<int>& context);
    std::vector<int> buildContext(QString* error) const;
    std::vector<int> parseIds(const QString& text, QString* error) const;
    void render();
    void scheduleRender();
    void updateButtons();
    void updateContextMeter();
    void setContextUsed(int used);
    QString tokenStyle(const GeneratedToken& t) const;

    EngineController* m_engine;
    TelemetryStore* m_store;
    std::vector<ChatEntry> m_entries;
    QTextBrowser* m_view;
    QPlainTextEdit *m_input, *m_system;
    QPushButton *m_send, *m_stop, *m_regen, *m_continue, *m_edit;
    QComboBox* m_colouring;
    QSpinBox* m_colourLayer;
    QDoubleSpinBox *m_temp, *m_topP, *m_minP, *m_rep, *m_freq, *m_pres;
    QSpinBox *m_topK, *m_maxTokens, *m_seed;
    QCheckBox *m_mtp, *m_stopEos;
    QProgressBar* m_context;
    QLabel* m_contextText;             // "37 / 1024 tokens" beside the bar (text in the bar overflows it)
    QLabel* m_status;
    QTimer m_renderTimer;
    bool m_generating = false;
    bool m_sentNew = false;            // the running generation answers a new user message
};
