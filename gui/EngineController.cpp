// EngineController: jobs posted to the worker thread; results posted back as queued calls.
#include "EngineController.h"

#include <QDir>
#include <QFileInfo>
#include <QMetaObject>

#include <algorithm>
#include <chrono>
#include <exception>

#include "engine/backend.h"
#include "engine/config.h"
#include "engine/errors.h"
#include "engine/loader.h"
#include "engine/model/moe.h"
#include "engine/tokenizer/tokenizer.h"

using namespace moescope;

namespace {
constexpr int kMaxContext = 8192;  // positions the GUI session allocates at most
}

EngineController::EngineController(TelemetryStore* store, QObject* parent)
    : QObject(parent), m_store(store), m_worker(new QObject) {
    qRegisterMetaType<ModelInfo>();
    qRegisterMetaType<GeneratedToken>();
    qRegisterMetaType<GenerationSummary>();
    qRegisterMetaType<EvaluationReport>();
    m_thread.setObjectName(QStringLiteral("moescope-engine"));
    m_worker->moveToThread(&m_thread);
    m_thread.start();
}

EngineController::~EngineController() {
    cancel();
    // Release engine objects on the worker thread, then stop it.
    post([this] {
        std::lock_guard<std::mutex> lk(m_sessionMu);
        m_session.reset();
        m_backend.reset();
        m_model.reset();
        m_tokenizer.reset();
    });
    m_thread.quit();
    m_thread.wait();
    delete m_worker;  // its thread has finished: no event can reach it any more
    // Engine objects not released by the posted job (quit can win the race) go with the members.
}

template <class F> void EngineController::post(F&& f) {
    QMetaObject::invokeMethod(m_worker, std::forward<F>(f), Qt::QueuedConnection);
}

template <class F> void EngineController::reply(F&& f) {
    QMetaObject::invokeMethod(this, std::forward<F>(f), Qt::QueuedConnection);
}

void EngineController::loadModel(const QString& dir, const QString& backendRequest) {
    m_busy = true;
    emit busyChanged(true);
    emit loadStarted(dir);
    const int64_t job = ++m_jobId;
    post([this, dir, backendRequest, job] {
        (void)job;
        try {
            auto progress = [this](double f, const std::string& what) {
                QString w = QString::fromStdString(what);
                reply([this, f, w] { emit loadProgress(f, w); });
            };
            std::shared_ptr<Model> model = load_model(dir.toStdString(), progress);
            const ModelConfig& cfg = model->config();
            ModelInfo info;
            info.dir = dir;
            info.config = cfg.to_json();
            info.card = loaded_model_card(*model).to_json(cfg);
            info.vocabSize = cfg.vocab_size;
            info.eosId = cfg.eos_token_id.value_or(-1);
            info.mtpDepth = cfg.num_nextn_predict_layers;
            std::shared_ptr<const Tokenizer> tok;
            if (QFileInfo::exists(QDir(dir).filePath(QStringLiteral("tokenizer.json")))) {
                try {
                    tok = std::make_shared<const Tokenizer>(Tokenizer::load(dir.toStdString()));
                    info.hasTokenizer = true;
                    info.tokenizerNotice = QString::fromStdString(tok->chat_template().warning());
                } catch (const std::exception& e) {
                    info.tokenizerNotice = QStringLiteral("tokenizer.json could not be loaded (%1); prompts are token ids")
                                               .arg(QString::fromUtf8(e.what()));
                }
            } else {
                info.tokenizerNotice = QStringLiteral("no tokenizer.json in this folder: prompts are token ids");
            }
            const int cap = std::min(cfg.max_position_embeddings > 0 ? cfg.max_position_embeddings : kMaxContext,
                                     kMaxContext);
            BackendSelection sel = select_backend(backendRequest.toStdString(), model, cap);
            std::shared_ptr<Backend> backend(std::move(sel.backend));
            auto session = std::make_unique<Session>(backend, tok, cap);
            info.backendName = QString::fromStdString(backend->name());
            info.backendNotice = QString::fromStdString(sel.notice);
            info.contextCap = session->context_cap();
            // Everything succeeded: only now replace the previous model (a broken folder keeps it).
            {
                std::lock_guard<std::mutex> lk(m_sessionMu);
                m_session = std::move(session);
                m_backend = backend;
                m_model = model;
                m_tokenizer = tok;
            }
            m_session->set_sink(m_store->sink());
            if (m_latentLayer >= 0) m_session->set_latent_layer(m_latentLayer);
            m_session->set_want_scores(m_wantScores);
            m_store->sink()->reset();
            MetaRecord meta;
            meta.card = info.card;
            meta.config = info.config;
            meta.settings = {{"backend", backend->name()}, {"backend_notice", sel.notice},
                             {"source", dir.toStdString()}};
            m_store->sink()->record(meta);
            // The checkpoint's router bias as the first point of the bias-drift view (reset_bias
            // records every MoE layer's bias; at load it changes nothing).
            m_session->reset_bias();
            reply([this, info, tok] {
                m_info = info;
                m_tokenizerGui = tok;
                m_context.clear();
                m_loaded = true;
                m_busy = false;
                emit modelLoaded(info);
                emit busyChanged(false);
            });
        } catch (const std::exception& e) {
            QString msg = QString::fromUtf8(e.what());
            reply([this, dir, msg] {
                m_busy = false;
                emit loadFailed(dir, msg);
                emit busyChanged(false);
            });
        }
    });
}

void EngineController::generate(const std::vector<int>& context, const SamplingParams& params) {
    if (!m_loaded || context.empty()) {
        emit generationFailed(m_loaded ? tr("empty prompt") : tr("no model loaded"));
        return;
    }
    m_busy = true;
    emit busyChanged(true);
    const int64_t job = ++m_jobId;
    post([this, context, params, job] {
        GenerationSummary sum;
        try {
            Session& s = *m_session;
            const std::vector<int>& have = s.tokens();
            size_t common = 0;
            while (common < have.size() && common < context.size() && have[common] == context[common]) ++common;
            // Keep the common prefix of the cache (the session recomputes the logits after it).
            if (common < have.size()) {
                s.truncate(int(common));
                m_store->sink()->truncate(int(common));
            }
            std::vector<int> rest(context.begin() + std::ptrdiff_t(common), context.end());
            reply([this, n = int(rest.size())] { emit generationStarted(n); });
            if (m_cancelUpTo >= job) throw CancelledError("cancelled before prefill");
            const auto t0 = std::chrono::steady_clock::now();
            if (!rest.empty()) s.append(rest);
            const double prefill = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            auto onToken = [this, job](const TokenEvent& ev) {
                GeneratedToken t;
                t.id = ev.id;
                t.position = ev.position;
                t.text = QString::fromStdString(ev.text);
                t.drafted = ev.drafted;
                t.special = ev.special;
                t.surprisal = ev.surprisal;
                reply([this, t] { emit tokenGenerated(t); });
                return m_cancelUpTo < job;
            };
            GenerationResult res = s.generate(params, onToken);
            const GenerationStats& st = res.stats;
            sum.promptTokens = st.prompt_tokens;
            sum.tokens = st.generated_tokens;
            sum.tokensPerS = st.tokens_per_s();
            sum.ttft = prefill + st.time_to_first_token;  // generate() after append() starts its clock after prefill
            sum.mtp = params.mtp && m_model->config().num_nextn_predict_layers > 0;
            sum.draftTokens = st.mtp.draft_tokens;
            sum.acceptedTokens = st.mtp.accepted_tokens;
            sum.acceptance = st.mtp.acceptance_rate();
            sum.stopReason = QString::fromStdString(st.stop_reason);
            sum.backendNotice = QString::fromStdString(m_backend->notice());
            sum.ablation = ablationSummary();
            // Positions past the final context (drafts verified beyond a stop) were recorded: drop them.
            m_store->sink()->truncate(s.length());
        } catch (const CancelledError&) {
            sum.stopReason = QStringLiteral("cancelled");
        } catch (const std::exception& e) {
            QString msg = QString::fromUtf8(e.what());
            std::vector<int> ctx = m_session ? m_session->tokens() : std::vector<int>{};
            reply([this, msg, ctx] {
                m_context = ctx;
                m_busy = false;
                emit generationFailed(msg);
                emit busyChanged(false);
            });
            return;
        }
        std::vector<int> ctx = m_session->tokens();
        reply([this, sum, ctx] {
            m_context = ctx;
            m_busy = false;
            emit generationFinished(sum);
            emit busyChanged(false);
        });
    });
}

void EngineController::cancel() {
    m_cancelUpTo = m_jobId.load();
    if (!m_busy) return;
    std::lock_guard<std::mutex> lk(m_sessionMu);
    if (m_session) m_session->cancel();
}

void EngineController::setLatentLayer(int layer) {
    post([this, layer] {
        m_latentLayer = layer;
        if (m_session) m_session->set_latent_layer(layer);
    });
}

void EngineController::setOnlineBalancing(bool enabled, double gamma) {
    post([this, enabled, gamma] {
        if (m_session) m_session->set_online_balancing(OnlineBalancing{enabled, gamma});
    });
}

void EngineController::resetBias() {
    post([this] {
        if (m_session) m_session->reset_bias();
    });
}

// `layers`: new masks (the other layers keep theirs); drop_top for every MoE layer (-1: kept).
void EngineController::applyAblation(const std::map<int, std::vector<int>>& layers, int drop_top) {
    if (!m_session) return;
    // All or nothing (Session::set_ablation checks every layer before it changes one).
    const ModelConfig& c = m_backend->config();
    Ablation a = current_ablation(*m_backend);
    for (const auto& [l, ids] : layers) {
        check_moe_layer(c, l);
        a.masks[size_t(l)] = expert_mask(ids, c.n_routed_experts, l);
    }
    if (drop_top >= 0)  // the main model's MoE layers (those of a "*" spec)
        for (int l = 0; l < c.num_hidden_layers; ++l)
            if (c.is_moe_layer(l)) a.drop_top[size_t(l)] = drop_top;
    m_session->set_ablation(a);
    // The cache holds latents computed with the previous experts: the next message recomputes it.
    m_session->truncate(0);
    m_store->sink()->truncate(0);
}

QString EngineController::ablationSummary() const {
    QStringList parts;
    const ModelConfig& c = m_backend->config();
    int drop = 0;
    for (int l = 0; l < c.num_hidden_layers + c.num_nextn_predict_layers; ++l) {
        if (!c.is_moe_stack_layer(l)) continue;
        drop = std::max(drop, m_backend->drop_top_experts(l));
        QStringList ids;
        const auto mask = m_backend->disabled_experts(l);
        for (size_t e = 0; e < mask.size(); ++e)
            if (mask[e]) ids << QString::number(e);
        if (!ids.isEmpty()) parts << tr("layer %1: %2").arg(l).arg(ids.join(QLatin1Char(',')));
    }
    if (drop > 0) parts << tr("each token's top %1").arg(drop);
    return parts.join(QStringLiteral("; "));
}

void EngineController::setDisabledExperts(int layer, const QString& text) {
    post([this, layer, text] {
        if (!m_session) return;
        try {
            QString t = text;
            t.remove(QLatin1Char(' '));
            std::map<int, std::vector<int>> layers;
            if (t.isEmpty()) layers[layer] = {};
            else if (t.contains(QLatin1Char(':'))) layers = parse_expert_spec(t.toStdString(), m_backend->config());
            else layers = parse_expert_spec(QStringLiteral("%1:%2").arg(layer).arg(t).toStdString(), m_backend->config());
            applyAblation(layers, -1);
        } catch (const std::exception& e) {
            const QString msg = QString::fromUtf8(e.what());
            reply([this, msg] { emit ablationFailed(msg); });
        }
    });
}

void EngineController::setDropTopExperts(int r) {
    post([this, r] {
        if (!m_session) return;
        try {
            applyAblation({}, r);
        } catch (const std::exception& e) {
            const QString msg = QString::fromUtf8(e.what());
            reply([this, msg] { emit ablationFailed(msg); });
        }
    });
}

void EngineController::clearDisabledExperts() {
    post([this] {
        if (!m_session) return;
        const ModelConfig& c = m_backend->config();
        std::map<int, std::vector<int>> layers;
        bool dropping = false;
        for (int l = 0; l < c.num_hidden_layers + c.num_nextn_predict_layers; ++l) {
            if (!c.is_moe_stack_layer(l)) continue;
            if (!m_backend->disabled_experts(l).empty()) layers[l] = {};
            dropping = dropping || m_backend->drop_top_experts(l) > 0;
        }
        if (!layers.empty() || dropping) applyAblation(layers, 0);
    });
}

EvaluationRecord evaluationRecord(const EvaluationReport& r) {
    EvaluationRecord e;
    e.corpus = r.path.toStdString();
    e.context = r.context;
    e.text_tokens = r.textTokens;
    e.baseline = perplexity_run(r.baseline);
    e.ablated = r.ablated;
    if (r.ablated) {
        e.with_ablation = perplexity_run(r.withAblation);
        e.ablation = r.ablation.toStdString();
    }
    for (const TokenImpact& t : r.hurt) {
        const auto it = r.texts.find(t.token);
        e.hurt.push_back({t.token, it == r.texts.end() ? std::string() : it->second.toStdString(), t.count, t.baseline,
                          t.ablated, t.added});
    }
    for (const PerplexityResult& p : r.sweep) e.sweep.push_back(perplexity_run(p));
    e.sweep_layers = r.sweepLayers;
    e.sweep_experts = r.sweepExperts;
    e.sweep_expert_layer = r.sweepExperts.empty() ? -1 : r.sweepExpertLayer;
    return e;
}

EvaluationReport evaluationReport(const EvaluationRecord& e) {
    EvaluationReport r;
    r.path = QString::fromStdString(e.corpus);
    r.context = e.context;
    r.textTokens = int(e.text_tokens);
    r.baseline = perplexity_result(e.baseline);
    r.ablated = e.ablated;
    if (e.ablated) {
        r.withAblation = perplexity_result(e.with_ablation);
        r.ablation = QString::fromStdString(e.ablation);
    }
    for (const HurtToken& h : e.hurt) {
        r.hurt.push_back(TokenImpact{h.token, h.count, h.baseline, h.ablated, h.added});
        r.texts[h.token] = QString::fromStdString(h.text);
    }
    for (const PerplexityRun& p : e.sweep) r.sweep.push_back(perplexity_result(p));
    r.sweepLayers = e.sweep_layers;
    r.sweepExperts = e.sweep_experts;
    r.sweepExpertLayer = e.sweep_expert_layer;
    return r;
}

void EngineController::evaluate(const QString& path, int maxWindows, EvalSweep sweep, int showTokens, int expertLayer) {
    if (!m_loaded) {
        emit evaluationFailed(tr("no model loaded"));
        return;
    }
    m_busy = true;
    emit busyChanged(true);
    const int64_t job = ++m_jobId;
    post([this, path, maxWindows, sweep, showTokens, expertLayer, job] {
        EvaluationReport rep;
        rep.path = path;
        try {
            const ModelConfig& c = m_backend->config();
            // Read here, not on the GUI thread: a large file would freeze the window.
            const std::vector<int> ids = corpus_ids(m_tokenizer.get(), read_corpus(path.toStdString()), c.vocab_size);
            rep.textTokens = int(ids.size());
            PerplexityOptions o;
            o.context = std::min({512, c.max_position_embeddings, m_session->context_cap()});
            o.max_windows = maxWindows;
            o.keep_losses = true;
            rep.context = o.context;
            // The ablation in force, set aside for the baseline and put back after it (on the
            // backend alone: the session's cache and telemetry are not touched).
            const Ablation in_force = current_ablation(*m_backend);
            for (size_t l = 0; l < in_force.masks.size(); ++l)
                rep.ablated = rep.ablated || in_force.drop_top[l] > 0 || !in_force.masks[l].empty();
            rep.ablation = ablationSummary();
            auto progress = [this, job](const QString& what) {
                return [this, job, what](int done, int total) {
                    reply([this, done, total, what] { emit evaluationProgress(done, total, what); });
                    return m_cancelUpTo < job;
                };
            };
            // A run's ablation on the backend alone: the masks in force or none, and drop_top r in
            // the main model's MoE layers (those "Top off" sets), every one or `layer` alone.
            auto run_with = [&](bool masks, int r, int layer = -1) {
                Ablation a = in_force;
                if (!masks)
                    for (auto& m : a.masks) m.clear();
                for (int l = 0; l < int(a.drop_top.size()); ++l)
                    a.drop_top[size_t(l)] = l < c.num_hidden_layers && c.is_moe_layer(l) && (layer < 0 || l == layer) ? r : 0;
                set_ablation(*m_backend, a);
            };
            auto restore = [&] {
                if (rep.ablated || sweep != EvalSweep::None) set_ablation(*m_backend, in_force);
            };
            try {
                if (rep.ablated) run_with(false, 0);
                rep.baseline = evaluate_perplexity(*m_backend, ids, o, progress(tr("all experts")));
                if (rep.ablated && m_cancelUpTo < job) {
                    set_ablation(*m_backend, in_force);
                    rep.withAblation = evaluate_perplexity(*m_backend, ids, o, progress(tr("experts off")));
                }
                const RouterDims dims(c);
                auto allows = [&](int l, int r) {  // layer l's experts switched off leave room for r more
                    std::vector<uint8_t> mask = in_force.masks[size_t(l)];
                    mask.resize(size_t(c.n_routed_experts), 0);
                    try {
                        check_disabled_experts(dims, mask, l, r);
                        return true;
                    } catch (const Error&) {
                        return false;
                    }
                };
                for (int r = 0; sweep == EvalSweep::TopR && r <= dims.k && m_cancelUpTo < job; ++r) {
                    bool valid = true;
                    for (int l = 0; l < c.num_hidden_layers && valid; ++l) valid = !c.is_moe_layer(l) || allows(l, r);
                    if (!valid) break;
                    run_with(true, r);
                    rep.sweep.push_back(evaluate_perplexity(*m_backend, ids, o, progress(tr("top %1 off").arg(r))));
                }
                for (int l = 0; sweep == EvalSweep::PerLayer && l < c.num_hidden_layers && m_cancelUpTo < job; ++l) {
                    if (!c.is_moe_layer(l) || !allows(l, 1)) continue;
                    run_with(true, 1, l);
                    rep.sweep.push_back(evaluate_perplexity(*m_backend, ids, o, progress(tr("layer %1, top 1 off").arg(l))));
                    rep.sweepLayers.push_back(l);
                }
                if (sweep == EvalSweep::PerExpert && m_cancelUpTo < job) {
                    // The ablation in force is on the backend again here; each expert goes on top.
                    int current = -1;  // the expert whose run is going on, for the progress line
                    auto on_run = [&](int e, int, int) {
                        current = e;
                        return m_cancelUpTo < job;
                    };
                    for (const ExpertImportance& p : expert_importance(
                             *m_backend, ids, o, expertLayer, on_run,
                             [&](int done, int total) {
                                 return progress(tr("layer %1, expert %2 off").arg(expertLayer).arg(current))(done, total);
                             })) {
                        rep.sweep.push_back(p.result);
                        rep.sweepExperts.push_back(p.expert);
                    }
                    rep.sweepExpertLayer = expertLayer;
                }
            } catch (...) {
                restore();
                throw;
            }
            restore();
            if (m_cancelUpTo >= job) throw CancelledError("evaluation cancelled");
            if (rep.ablated) {
                rep.hurt = token_impact(ids, rep.baseline, rep.withAblation, 3, showTokens);
                for (const TokenImpact& t : rep.hurt)
                    rep.texts[t.token] = QString::fromStdString(token_piece(m_tokenizer.get(), t.token));
            }
            rep.baseline.losses.clear();  // the report crosses threads: only what the view draws
            rep.baseline.targets.clear();
            rep.withAblation.losses.clear();
            rep.withAblation.targets.clear();
            for (PerplexityResult& s : rep.sweep) s.losses.clear(), s.targets.clear();
            // Into the session's telemetry: saved with it, and replayed into the Evaluate view.
            EvaluationRecord rec = evaluationRecord(rep);
            rec.step = m_session ? m_session->step() : 0;
            m_store->sink()->record(std::move(rec));
        } catch (const std::exception& e) {
            const QString msg = dynamic_cast<const CancelledError*>(&e) ? tr("evaluation cancelled")
                                                                        : QString::fromUtf8(e.what());
            reply([this, msg] {
                m_busy = false;
                emit evaluationFailed(msg);
                emit busyChanged(false);
            });
            return;
        }
        reply([this, rep] {
            m_busy = false;
            emit evaluationFinished(rep);
            emit busyChanged(false);
        });
    });
}

void EngineController::setWantScores(bool on) {
    post([this, on] {
        m_wantScores = on;
        if (m_session) m_session->set_want_scores(on);
    });
}
