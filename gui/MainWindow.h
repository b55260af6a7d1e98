// MainWindow: assembles the chat, the docked views, menus, status bar and settings. It holds no
// logic of its own beyond wiring: the engine is in EngineController, the data in TelemetryStore.
#pragma once
#include <QActionGroup>
#include <QMainWindow>
#include <QMap>

class QDockWidget;
class QLabel;
class QMenu;
class QProgressBar;
class ChatWidget;
class EngineController;
class PlotView;
class TelemetryStore;
class TraceReplayTrainer;
class TrainerRunner;
struct ModelInfo;

class MainWindow : public QMainWindow {
    Q_OBJECT
public:
    // persistent: read and write QSettings (off in tests).
    explicit MainWindow(bool persistent = true, QWidget* parent = nullptr);
    ~MainWindow() override;

    // The model the app opens at start: resources/models/default (next to the executable, then
    // in the source tree), else the tiny-v3 test fixture; `notice` says which and why.
    static QString defaultModelDir(QString* notice = nullptr);
    void openModel(const QString& dir);
    void openDefaultModel();
    bool openTrace(const QString& path, QString* error = nullptr);
    bool saveTelemetry(const QString& path, QString* error = nullptr);
    // Every view's PNG, PDF and CSV into dir, each at PlotView::defaultExportSize() (on screen or not).
    bool exportAllViews(const QString& dir, QString* error = nullptr);
    bool showView(const QString& name);     // raise a view's dock ("routing", "bias", ...)
    PlotView* view(const QString& name) const;
    QList<PlotView*> views() const { return m_views; }
    ChatWidget* chat() const { return m_chat; }
    EngineController* engine() const { return m_engine; }
    TelemetryStore* store() const { return m_store; }
    TraceReplayTrainer* trainer() const { return m_trainer; }
    TrainerRunner* engineTrainer() const { return m_engineTrainer; }
    QString bannerText() const;
    QStringList recentModels() const { return m_recent; }
    QString backendText() const;
    // "auto" (the GPU when one can run the model, else the CPU), "cpu" or "cuda". Changing it
    // reloads the open model on the chosen backend; a failure leaves the previous one working.
    void setBackendRequest(const QString& request);
    QString backendRequest() const { return m_backendRequest; }
    void setDark(bool dark);
    bool isDark() const { return m_dark; }

protected:
    void closeEvent(QCloseEvent* e) override;
    void showEvent(QShowEvent* e) override;
    void dragEnterEvent(QDragEnterEvent* e) override;
    void dropEvent(QDropEvent* e) override;

private:
    void buildMenus();
    QDockWidget* addView(PlotView* v, Qt::DockWidgetArea area, const QKeySequence& key);
    void setBanner(const QString& text, bool error);
    void addRecent(const QString& dir);
    void rebuildRecent();
    void onModelLoaded(const ModelInfo& info);
    void saveSettings();
    void loadSettings();

    bool m_persistent;
    bool m_dark = false;
    TelemetryStore* m_store;
    EngineController* m_engine;
    TraceReplayTrainer* m_trainer;
    TrainerRunner* m_engineTrainer = nullptr;  // the engine's trainer, when built with engine/train
    ChatWidget* m_chat;
    QList<PlotView*> m_views;
    QMap<QString, QDockWidget*> m_docks;
    QMenu *m_recentMenu = nullptr, *m_viewMenu = nullptr;
    QLabel *m_banner, *m_backend, *m_modelLabel;
    QProgressBar* m_progress;
    QStringList m_recent;
    QString m_defaultNotice;
    QString m_loadingDir;
    bool m_bannerError = false;
    bool m_layoutDone = false;     // the first show sized the docks
    QString m_backendRequest = QStringLiteral("auto");
    QString m_modelDir;            // the model open now
    QActionGroup* m_backendGroup = nullptr;
    bool m_restoredState = false;  // QSettings held a dock layout
};
