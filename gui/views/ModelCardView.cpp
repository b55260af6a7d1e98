// ModelCardView: the engine's model card text plus a layer table built from the config.
#include "views/ModelCardView.h"

#include <QGridLayout>
#include <QHeaderView>
#include <QPlainTextEdit>
#include <QTableWidget>
#include <QTextStream>
#include <QVBoxLayout>

#include "TelemetryStore.h"
#include "engine/config.h"

using namespace moescope;

ModelCardView::ModelCardView(TelemetryStore* store, QWidget* parent)
    : PlotView(store, QStringLiteral("card"), tr("Model card"), parent) {
    m_text = new QPlainTextEdit;
    m_text->setReadOnly(true);
    QFont mono(QStringLiteral("DejaVu Sans Mono"));
    mono.setStyleHint(QFont::Monospace);
    mono.setPointSizeF(font().pointSizeF() * 0.9);
    m_text->setFont(mono);
    m_table = new QTableWidget;
    m_table->setColumnCount(6);
    m_table->setHorizontalHeaderLabels({tr("layer"), tr("kind"), tr("attention (MLA ranks)"), tr("routed experts"),
                                        tr("shared"), tr("MLP width")});
    m_table->horizontalHeader()->setSectionResizeMode(QHeaderView::ResizeToContents);
    m_table->horizontalHeader()->setStretchLastSection(true);
    m_table->verticalHeader()->setVisible(false);
    m_table->setEditTriggers(QAbstractItemView::NoEditTriggers);
    // Side by side: the card is a dozen short lines, the table one row per layer (61 for V3).
    plotGrid()->addWidget(m_text, 0, 0);
    plotGrid()->addWidget(m_table, 0, 1);
    plotGrid()->setColumnStretch(0, 2);
    plotGrid()->setColumnStretch(1, 3);
    controls()->addStretch(1);
}

void ModelCardView::refresh() {
    const auto& meta = m_store->meta();
    if (!meta) {
        m_text->setPlainText(tr("No model loaded."));
        m_table->setRowCount(0);
        m_shownKey.clear();
        return;
    }
    const std::string key = meta->config.dump() + meta->settings.dump();
    if (key == m_shownKey) return;
    m_shownKey = key;
    try {
        ModelConfig cfg = ModelConfig::from_json(meta->config, "meta record");
        ModelCard card = model_card(cfg);
        if (meta->card.is_object() && meta->card.contains("weight_storage")) {  // how the loaded weights are held
            card.weight_storage = meta->card.value("weight_storage", std::string());
            card.weight_bytes = meta->card.value("weight_bytes", int64_t(0));
        }
        QString text = QString::fromStdString(card.to_text(cfg));
        if (meta->settings.is_object()) {
            text += QStringLiteral("\nsource          %1\nbackend         %2\n")
                        .arg(QString::fromStdString(meta->settings.value("source", std::string("?"))),
                             QString::fromStdString(meta->settings.value("backend", std::string("?"))));
            const std::string notice = meta->settings.value("backend_notice", std::string());
            if (!notice.empty()) text += QStringLiteral("                %1\n").arg(QString::fromStdString(notice));
        }
        m_text->setPlainText(text);
        const int L = cfg.num_hidden_layers, M = cfg.num_nextn_predict_layers;
        m_table->setRowCount(L + M);
        const QString mla = QStringLiteral("q_lora %1, kv_lora %2, rope %3, %4 heads")
                                .arg(cfg.q_lora_rank)
                                .arg(cfg.kv_lora_rank)
                                .arg(cfg.qk_rope_head_dim)
                                .arg(cfg.num_attention_heads);
        for (int l = 0; l < L + M; ++l) {
            const bool mtp = l >= L;
            const bool moe = mtp ? cfg.n_routed_experts > 0 : cfg.is_moe_layer(l);
            const QStringList cells = {
                QString::number(l),
                mtp ? tr("MTP module %1 (%2)").arg(l - L + 1).arg(moe ? tr("MoE") : tr("dense")) : (moe ? tr("MoE") : tr("dense")),
                mla,
                moe ? tr("%1 (top-%2, %3 groups keep %4)").arg(cfg.n_routed_experts).arg(cfg.num_experts_per_tok).arg(cfg.n_group).arg(cfg.topk_group)
                    : QStringLiteral("-"),
                moe ? QString::number(cfg.n_shared_experts) : QStringLiteral("-"),
                QString::number(moe ? cfg.moe_intermediate_size : cfg.intermediate_size)};
            for (int c = 0; c < cells.size(); ++c) m_table->setItem(l, c, new QTableWidgetItem(cells[c]));
        }
    } catch (const std::exception& e) {
        m_text->setPlainText(tr("The meta record's config could not be read: %1").arg(QString::fromUtf8(e.what())));
        m_table->setRowCount(0);
    }
}

int ModelCardView::layerRows() const { return m_table->rowCount(); }

QString ModelCardView::csv() const {
    QString out;
    QTextStream s(&out);
    for (int c = 0; c < m_table->columnCount(); ++c)
        s << (c ? "," : "") << csvEscape(m_table->horizontalHeaderItem(c)->text());
    s << '\n';
    for (int r = 0; r < m_table->rowCount(); ++r) {
        for (int c = 0; c < m_table->columnCount(); ++c)
            s << (c ? "," : "") << csvEscape(m_table->item(r, c) ? m_table->item(r, c)->text() : QString());
        s << '\n';
    }
    if (const auto& m = m_store->meta()) {
        for (const auto& [k, v] : m->card.items()) s << "card," << QString::fromStdString(k) << ',' << csvEscape(QString::fromStdString(v.dump())) << '\n';
    }
    return out;
}
