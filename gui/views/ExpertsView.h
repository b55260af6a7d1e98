// ExpertsView: expert specialization, which tokens each routed expert takes. For one MoE layer a
// table of its experts (share of the routings, mean mixing weight, top tokens as
// "tok ×n (p%)"), the selected expert's top tokens as bars, and every layer's token
// consistency against its chance level. The numbers are engine/expert_analysis.h's over the
// store's route records (the text on screen), the same as `moescope-cli experts`.
#pragma once
#include <QElapsedTimer>
#include <QTimer>

#include <map>
#include <string>

#include "engine/expert_analysis.h"
#include "views/PlotView.h"

class QComboBox;
class QLabel;
class QTableWidget;
class QCPBars;
class QCPGraph;

class ExpertsView : public PlotView {
    Q_OBJECT
public:
    explicit ExpertsView(TelemetryStore* store, QWidget* parent = nullptr);
    QString csv() const override;

    int layer() const;                       // the MoE layer shown (-1: none yet)
    void setLayer(int layer);
    int expert() const { return m_expert; }  // the expert of the bar chart
    void setExpert(int expert);
    moescope::TokenRank rank() const;
    void setRank(moescope::TokenRank r);
    static constexpr int kTopTokens = 12;    // tokens per expert in the bars
    static constexpr int kTableTokens = 5;   // of which the table lists the first

    // What is drawn, for tests: the analysis of the shown layer, the table and the charts.
    const moescope::LayerExperts* shownLayer() const;
    const moescope::ExpertAnalysis& overview() const { return m_overview; }
    QTableWidget* table() const { return m_table; }
    int tokenBarCount() const;
    QStringList tokenBarLabels() const;
    int overviewPoints() const;
    QString summaryText() const;
    // Forgets the cached analyses: the next refresh recomputes them (timing the full rebuild).
    void invalidateAnalysis() { m_analyzedRecords = m_overviewRecords = -1; }
    // While records stream, the all-layer overview is recounted at most this often (refreshNow,
    // exports and screenshots always recount it).
    static constexpr qint64 kOverviewIntervalMs = 500;
    // The position the last click on a token bar selected (-1: none).
    int selectTokenBar(int index);

protected:
    void refresh() override;
    void flushDeferred() override { m_overviewClock.invalidate(); }
    void themeChanged() override;            // the table's tints and the bar labels follow the palette

private:
    void rebuildLayerChoices();
    void fillTable(const moescope::LayerExperts& L);
    void fillBars(const moescope::LayerExperts* L);
    void markExpertRow();                    // bold + tint on the chosen expert's row
    QString tokenText(int id) const;

    QComboBox* m_layer;
    QComboBox* m_rank;
    QLabel* m_info;
    QTableWidget* m_table;
    QCustomPlot *m_barPlot, *m_layerPlot;
    QCPBars *m_tokenBars, *m_rareBars;
    QCPBars* m_specBars;
    QCPGraph *m_consistency, *m_chance;
    int m_expert = 0;
    int m_markedRow = -1;
    int m_layerCount = -1;
    // The analyses are rebuilt only when the records, the layer or the ranking change
    // (a selection change redraws every view).
    qint64 m_analyzedRecords = -1, m_overviewRecords = -1;
    QElapsedTimer m_overviewClock;
    QTimer m_overviewTimer;                  // the overview's deferred recount
    int m_analyzedLayer = -2;
    int m_analyzedRank = -1;
    moescope::ExpertAnalysis m_detail;       // the shown layer, with token lists
    moescope::ExpertAnalysis m_overview;     // every layer, counts and summary only
    std::map<int, std::string> m_texts;      // token id -> text, from the store's token records
    std::vector<int> m_barTokens;            // token ids of the bars, top first
};
