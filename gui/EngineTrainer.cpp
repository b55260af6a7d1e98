// EngineTrainer: Trainer::step() in a loop on a worker thread.
#include "EngineTrainer.h"

#include <QDateTime>
#include <QDir>
#include <QFileInfo>
#include <QStandardPaths>

#include "engine/config.h"
#include "engine/tokenizer/tokenizer.h"
#include "engine/train/data.h"
#include "engine/train/trainer.h"
#include "engine/weights.h"

using namespace moescope;

EngineTrainer::EngineTrainer(TelemetrySink* sink, QObject* parent) : TrainerRunner(parent), m_sink(sink) {}

EngineTrainer::~EngineTrainer() {
    stop();
    if (m_thread) {
        m_thread->wait();
        delete m_thread;
    }
}

QString EngineTrainer::presetConfigPath(const QString& preset) {
    if (preset == QLatin1String("tiny")) return QStringLiteral(MOESCOPE_GUI_SOURCE_DIR "/tests/fixtures/tiny-v3/config.json");
    if (preset == QLatin1String("small")) return QStringLiteral(MOESCOPE_GUI_SOURCE_DIR "/gui/presets/small.json");
    return {};
}

bool EngineTrainer::start(const TrainSettings& s, QString* error) {
    if (state() == State::Running || state() == State::Paused) {
        if (error) *error = tr("training is already running");
        return false;
    }
    const QString cfg = s.configPath.isEmpty() ? presetConfigPath(s.preset) : s.configPath;
    if (cfg.isEmpty() || !QFileInfo::exists(cfg)) {
        if (error) *error = tr("no model config: choose a preset or a config.json (%1)").arg(cfg);
        return false;
    }
    if (s.corpus.isEmpty()) {
        if (error) *error = tr("choose one or more corpus text files");
        return false;
    }
    for (const QString& f : s.corpus)
        if (!QFileInfo::exists(f)) {
            if (error) *error = tr("corpus file %1 does not exist").arg(f);
            return false;
        }
    if (m_thread) {
        m_thread->wait();
        delete m_thread;
    }
    TrainSettings run = s;
    run.configPath = cfg;
    m_stop = false;
    m_paused = false;
    setState(State::Running);
    m_thread = QThread::create([this, run] { this->run(run); });
    m_thread->setObjectName(QStringLiteral("moescope-trainer"));
    m_thread->start(QThread::LowPriority);
    return true;
}

void EngineTrainer::run(TrainSettings s) {
    auto post = [this](auto f) { QMetaObject::invokeMethod(this, std::move(f), Qt::QueuedConnection); };
    try {
        ModelConfig cfg = ModelConfig::load(s.configPath.toStdString());
        std::unique_ptr<Tokenizer> tok;
        const QString dir = QFileInfo(s.configPath).absolutePath();
        if (QFileInfo::exists(dir + QStringLiteral("/tokenizer.json"))) tok = std::make_unique<Tokenizer>(Tokenizer::load(dir.toStdString()));
        std::vector<std::filesystem::path> files;
        for (const QString& f : s.corpus) files.emplace_back(f.toStdString());
        std::vector<int> tokens = tokenize_corpus(files, tok.get());
        if (tok) cfg.vocab_size = tok->vocab_size();
        else cfg.vocab_size = std::max(cfg.vocab_size, 256);  // byte-level ids
        cfg.validate();
        TrainOptions o;
        o.steps = s.steps;
        o.warmup = std::min<int64_t>(o.warmup, o.steps / 10);
        o.eval_every = std::max<int64_t>(10, o.steps / 10);
        o.loss.balance = parse_balance_mode(s.balance.toStdString());
        o.gamma = s.gamma;
        QString out = s.outDir;
        if (out.isEmpty())
            out = QStandardPaths::writableLocation(QStandardPaths::AppLocalDataLocation) + QStringLiteral("/trained/") +
                  QDateTime::currentDateTime().toString(QStringLiteral("yyyyMMdd-HHmmss"));
        QDir().mkpath(out);
        o.out_dir = (out + QStringLiteral("/run")).toStdString();
        if (tok) o.tokenizer = dir.toStdString();
        Trainer trainer(cfg, o, std::move(tokens), m_sink);
        {
            std::lock_guard<std::mutex> lk(m_mu);
            m_cancel = &trainer.cancel_flag();
            if (m_stop) trainer.cancel();
        }
        while (!trainer.done() && !trainer.cancelled()) {
            {
                std::unique_lock<std::mutex> lk(m_mu);
                m_cv.wait(lk, [this] { return !m_paused || m_stop; });
            }
            if (m_stop) break;
            StepStats st = trainer.step();
            post([this, step = st.step, total = o.steps] { emit progress(step, total); });
        }
        {
            std::lock_guard<std::mutex> lk(m_mu);
            m_cancel = nullptr;
        }
        // The weights so far as a model folder (config + safetensors + tokenizer) for the chat.
        const std::filesystem::path model = (out + QStringLiteral("/model")).toStdString();
        Weights weights = trainer.weights();
        save_checkpoint(model, trainer.config(), weights, SaveFormat::F32);
        if (tok)
            for (const char* f : {"tokenizer.json", "tokenizer_config.json"})
                if (std::filesystem::exists(std::filesystem::path(dir.toStdString()) / f))
                    std::filesystem::copy_file(std::filesystem::path(dir.toStdString()) / f, model / f,
                                               std::filesystem::copy_options::overwrite_existing);
        const QString modelDir = QString::fromStdString(model.string());
        post([this, modelDir] {
            setState(State::Finished);
            emit finished(modelDir);
        });
    } catch (const std::exception& e) {
        const QString msg = QString::fromUtf8(e.what());
        {
            std::lock_guard<std::mutex> lk(m_mu);
            m_cancel = nullptr;
        }
        post([this, msg] {
            setState(State::Failed);
            emit failed(msg);
        });
    }
}

void EngineTrainer::pause() {
    if (state() != State::Running) return;
    {
        std::lock_guard<std::mutex> lk(m_mu);
        m_paused = true;
    }
    setState(State::Paused);
}

void EngineTrainer::resume() {
    if (state() != State::Paused) return;
    {
        std::lock_guard<std::mutex> lk(m_mu);
        m_paused = false;
    }
    m_cv.notify_all();
    setState(State::Running);
}

void EngineTrainer::stop() {
    {
        std::lock_guard<std::mutex> lk(m_mu);
        m_stop = true;
        m_paused = false;
        if (m_cancel) m_cancel->store(true);
    }
    m_cv.notify_all();
}

bool EngineTrainer::wait(int ms) { return !m_thread || m_thread->wait(ms); }
