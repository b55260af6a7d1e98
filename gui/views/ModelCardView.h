// ModelCardView: the model card of the loaded model (or of a replayed trace's meta record):
// parameters total / active / MTP, cache bytes per token, and a per-layer table.
#pragma once
#include <string>

#include "views/PlotView.h"

class QPlainTextEdit;
class QTableWidget;

class ModelCardView : public PlotView {
    Q_OBJECT
public:
    explicit ModelCardView(TelemetryStore* store, QWidget* parent = nullptr);
    QString csv() const override;
    int layerRows() const;

protected:
    void refresh() override;

private:
    QPlainTextEdit* m_text;
    QTableWidget* m_table;
    std::string m_shownKey;
};
