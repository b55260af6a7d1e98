// TelemetryStore: ingest of engine records into per-view indexes; coalesced change signals.
#include "TelemetryStore.h"

#include <QMetaObject>

#include "engine/config.h"

using namespace moescope;

int ModelShape::rowOf(int layer) const {
    for (size_t i = 0; i < moeLayers.size(); ++i)
        if (moeLayers[i] == layer) return int(i);
    return -1;
}

TelemetryStore::TelemetryStore(QObject* parent) : QObject(parent), m_sink(std::make_unique<Sink>(this)) {
    m_timer.setSingleShot(true);
    m_timer.setInterval(40);
    connect(&m_timer, &QTimer::timeout, this, &TelemetryStore::drain);
}

TelemetryStore::~TelemetryStore() = default;

void TelemetryStore::Sink::push(Item it) {
    {
        std::lock_guard<std::mutex> lk(m_mu);
        m_queue.push_back(std::move(it));
    }
    // One queued call per batch: the engine thread never waits for the UI.
    if (!m_scheduled.exchange(true))
        QMetaObject::invokeMethod(m_store, [s = m_store] { s->scheduleDrain(); }, Qt::QueuedConnection);
}

void TelemetryStore::Sink::record(const Record& r) {
    Item it;
    it.rec = r;
    push(std::move(it));
}

void TelemetryStore::Sink::record(Record&& r) {
    Item it;
    it.rec = std::move(r);
    push(std::move(it));
}

void TelemetryStore::Sink::truncate(int positions) {
    Item it;
    it.truncateTo = positions;
    push(std::move(it));
}

void TelemetryStore::Sink::reset() {
    Item it;
    it.reset = true;
    push(std::move(it));
}

void TelemetryStore::scheduleDrain() {
    if (!m_timer.isActive()) m_timer.start();
}

void TelemetryStore::drain() {
    std::vector<Sink::Item> items;
    {
        std::lock_guard<std::mutex> lk(m_sink->m_mu);
        items.swap(m_sink->m_queue);
        m_sink->m_scheduled = false;
    }
    if (items.empty()) return;
    for (auto& it : items) {
        if (it.reset) clear();
        if (it.truncateTo >= 0) truncate(it.truncateTo);
        if (it.rec) ingest(*it.rec);
    }
    if (m_shapeDirty) {
        m_shapeDirty = false;
        emit shapeChanged();
    }
    emit changed();
}

void TelemetryStore::flush() {
    m_timer.stop();
    drain();
}

int TelemetryStore::dropTop(int layer) const {
    const auto it = m_dropTop.find(layer);
    return it == m_dropTop.end() ? 0 : it->second;
}

const std::vector<int>& TelemetryStore::disabled(int layer) const {
    static const std::vector<int> none;
    const auto it = m_disabled.find(layer);
    return it == m_disabled.end() ? none : it->second;
}

void TelemetryStore::clear() {
    m_all.clear();
    m_meta.reset();
    m_shape = ModelShape{};
    m_tokens.clear();
    m_routes.clear();
    m_latent.clear();
    m_loadTotal.clear();
    m_loadMessage.clear();
    m_loadStep.clear();
    m_maxVio.clear();
    m_disabled.clear();
    m_dropTop.clear();
    m_bias.clear();
    m_mtp.clear();
    m_timing.clear();
    m_train.clear();
    m_eval.clear();
    m_evaluations.clear();
    m_generations.clear();
    m_loadStepId = -1;
    m_selected = -1;
    m_shapeDirty = true;
}

void TelemetryStore::replace(const std::vector<Record>& records) {
    flush();
    clear();
    for (const auto& r : records) ingest(r);
    m_shapeDirty = false;
    emit shapeChanged();
    emit changed();
    if (!m_tokens.empty()) select(m_tokens.rbegin()->first);
}

void TelemetryStore::truncate(int positions) {
    m_tokens.erase(m_tokens.lower_bound(positions), m_tokens.end());
    m_routes.erase(m_routes.lower_bound(positions), m_routes.end());
    m_latent.erase(m_latent.lower_bound(positions), m_latent.end());
    if (m_selected >= positions) m_selected = -1;
}

void TelemetryStore::addGeneration(const GenerationSummary& g) {
    // The summary comes straight from the engine controller, the records through the sink's
    // queue: drain it first, so a reset still queued (a model loaded just before a fast
    // generation) cannot clear this summary after it was added.
    flush();
    m_generations.push_back(g);
    emit changed();
}

void TelemetryStore::beginMessage() {
    m_loadMessage.clear();
}

void TelemetryStore::select(int position) {
    m_selected = position;
    emit selectionChanged(position);
}

const std::vector<int64_t>* TelemetryStore::load(int layer, LoadScope scope) const {
    const auto& m = scope == LoadScope::Total ? m_loadTotal : scope == LoadScope::Message ? m_loadMessage : m_loadStep;
    auto it = m.find(layer);
    return it == m.end() ? nullptr : &it->second;
}

void TelemetryStore::setMeta(const MetaRecord& m) {
    m_meta = m;
    ModelShape s;
    try {
        ModelConfig cfg = ModelConfig::from_json(m.config, "trace meta record");
        ModelCard card = model_card(cfg);
        s.numLayers = cfg.num_hidden_layers;
        s.numExperts = cfg.n_routed_experts;
        s.topK = cfg.num_experts_per_tok;
        s.nGroup = cfg.n_group;
        s.topkGroup = cfg.topk_group;
        s.dC = cfg.kv_lora_rank;
        s.dRope = cfg.qk_rope_head_dim;
        s.mtpDepth = cfg.num_nextn_predict_layers;
        s.maxPositions = cfg.max_position_embeddings;
        s.heads = cfg.num_attention_heads;
        s.latentBytesPerToken = card.latent_cache_bytes_per_token;
        s.mhaBytesPerToken = card.mha_cache_bytes_per_token;
        s.gqaBytesPerToken = card.gqa8_cache_bytes_per_token;
        for (int l = 0; l < cfg.num_hidden_layers; ++l)
            if (cfg.is_moe_layer(l)) s.moeLayers.push_back(l);
    } catch (const std::exception&) {
        // A trace from another tool may carry a partial config: size plots from the records.
    }
    if (m.settings.is_object() && m.settings.contains("source"))
        s.name = QString::fromStdString(m.settings.value("source", std::string()));
    m_shape = s;
    m_shapeDirty = true;
}

void TelemetryStore::ingest(const Record& rec) {
    m_all.push_back(rec);
    std::visit(
        [this](const auto& r) {
            using T = std::decay_t<decltype(r)>;
            if constexpr (std::is_same_v<T, MetaRecord>) {
                setMeta(r);
            } else if constexpr (std::is_same_v<T, TokenRecord>) {
                m_tokens[r.position] = r;
            } else if constexpr (std::is_same_v<T, RouteRecord>) {
                // Records of MTP modules (layers >= L) are kept apart from the main model's.
                bool main = r.layers.empty() || m_shape.numLayers == 0 || r.layers.front() < m_shape.numLayers;
                if (main) m_routes[r.position] = r;
                if (m_shape.numExperts == 0 && r.E > 0) m_shape.numExperts = r.E;
                if (m_shape.topK == 0) m_shape.topK = r.k;
                if (m_shape.moeLayers.empty() && main) {
                    m_shape.moeLayers = r.layers;
                    m_shapeDirty = true;
                }
            } else if constexpr (std::is_same_v<T, LoadRecord>) {
                if (r.step != m_loadStepId) {
                    m_loadStep.clear();
                    m_loadStepId = r.step;
                }
                auto add = [&](std::map<int, std::vector<int64_t>>& m) {
                    auto& v = m[r.layer];
                    if (v.size() < r.counts.size()) v.resize(r.counts.size(), 0);
                    for (size_t e = 0; e < r.counts.size(); ++e) v[e] += r.counts[e];
                };
                add(m_loadTotal);
                add(m_loadMessage);
                add(m_loadStep);
                if (m_shape.numExperts == 0) m_shape.numExperts = int(r.counts.size());
                // MaxVio of the running totals: a decode step routes a handful of tokens, whose own
                // MaxVio says little; the cumulative load shows whether balancing is converging.
                double v = max_violation(m_loadTotal[r.layer]);
                auto it = m_maxVio.find(r.step);
                if (it == m_maxVio.end()) m_maxVio[r.step] = v;
                else it->second = std::max(it->second, v);
            } else if constexpr (std::is_same_v<T, BiasRecord>) {
                m_bias[r.layer].push_back(r);
            } else if constexpr (std::is_same_v<T, AblationRecord>) {
                if (r.disabled.empty()) m_disabled.erase(r.layer);
                else m_disabled[r.layer] = r.disabled;
                if (r.drop_top == 0) m_dropTop.erase(r.layer);
                else m_dropTop[r.layer] = r.drop_top;
            } else if constexpr (std::is_same_v<T, LatentRecord>) {
                m_latent[r.position] = r;
            } else if constexpr (std::is_same_v<T, MtpRecord>) {
                m_mtp.push_back(r);
            } else if constexpr (std::is_same_v<T, TimingRecord>) {
                m_timing.push_back(r);
            } else if constexpr (std::is_same_v<T, TrainRecord>) {
                m_train.push_back(r);
            } else if constexpr (std::is_same_v<T, EvalRecord>) {
                m_eval.push_back(r);
            } else if constexpr (std::is_same_v<T, EvaluationRecord>) {
                m_evaluations.push_back(r);
            }
        },
        rec);
}
