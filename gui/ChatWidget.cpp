// ChatWidget: messages, streaming, sampling settings and the clickable token text.
#include "ChatWidget.h"

#include <QCheckBox>
#include <QComboBox>
#include <QDoubleSpinBox>
#include <QFile>
#include <QFormLayout>
#include <QGroupBox>
#include <QHBoxLayout>
#include <QJsonArray>
#include <QJsonDocument>
#include <QLabel>
#include <QPlainTextEdit>
#include <QProgressBar>
#include <QPushButton>
#include <QSaveFile>
#include <QScrollArea>
#include <QScrollBar>
#include <QShortcut>
#include <QSpinBox>
#include <QSplitter>
#include <QTextBrowser>
#include <QVBoxLayout>

#include "TelemetryStore.h"
#include "engine/tokenizer/tokenizer.h"

using namespace moescope;

ChatWidget::ChatWidget(EngineController* engine, TelemetryStore* store, QWidget* parent)
    : QWidget(parent), m_engine(engine), m_store(store) {
    setObjectName(QStringLiteral("chat"));
    auto* split = new QSplitter(Qt::Horizontal, this);
    auto* outer = new QVBoxLayout(this);
    outer->setContentsMargins(0, 0, 0, 0);
    outer->addWidget(split);

    // Left: conversation, input, buttons.
    auto* left = new QWidget;
    auto* lv = new QVBoxLayout(left);
    lv->setContentsMargins(4, 4, 4, 4);
    m_system = new QPlainTextEdit;
    m_system->setObjectName(QStringLiteral("systemPrompt"));
    m_system->setPlaceholderText(tr("System prompt (optional)"));
    m_system->setMaximumHeight(48);
    lv->addWidget(m_system);
    m_view = new QTextBrowser;
    m_view->setObjectName(QStringLiteral("conversation"));
    m_view->setOpenLinks(false);
    m_view->setOpenExternalLinks(false);
    lv->addWidget(m_view, 1);
    auto* colourRow = new QHBoxLayout;
    colourRow->addWidget(new QLabel(tr("Colour:")));
    m_colouring = new QComboBox;
    m_colouring->setToolTip(tr("Colour the answer's tokens by the top expert of a layer, by MTP (accepted drafts in green) "
                               "or by surprisal (-log2 p under the main model)"));
    m_colouring->addItems({tr("nothing"), tr("top expert of layer"), tr("MTP drafted / accepted"), tr("surprisal")});
    m_colouring->setSizeAdjustPolicy(QComboBox::AdjustToMinimumContentsLengthWithIcon);
    m_colouring->setMinimumContentsLength(12);
    colourRow->addWidget(m_colouring);
    m_colourLayer = new QSpinBox;
    m_colourLayer->setPrefix(tr("layer "));
    m_colourLayer->setRange(0, 255);
    m_colourLayer->setValue(1);
    colourRow->addWidget(m_colourLayer);
    colourRow->addStretch(1);
    colourRow->addWidget(new QLabel(tr("Context:")));
    m_context = new QProgressBar;
    m_context->setObjectName(QStringLiteral("contextMeter"));
    m_context->setFixedWidth(90);
    m_context->setMaximumHeight(14);
    m_context->setTextVisible(false);
    m_context->setValue(0);
    colourRow->addWidget(m_context);
    m_contextText = new QLabel;
    m_contextText->setObjectName(QStringLiteral("contextText"));
    m_contextText->setText(tr("no model"));
    colourRow->addWidget(m_contextText);
    lv->addLayout(colourRow);
    m_input = new QPlainTextEdit;
    m_input->setObjectName(QStringLiteral("chatInput"));
    m_input->setMaximumHeight(80);
    lv->addWidget(m_input);
    auto* buttons = new QHBoxLayout;
    m_send = new QPushButton(QIcon(QStringLiteral(":/icons/send.svg")), tr("Send"));
    m_send->setToolTip(tr("Send (Ctrl+Return)"));
    m_stop = new QPushButton(QIcon(QStringLiteral(":/icons/stop.svg")), tr("Stop"));
    m_stop->setToolTip(tr("Stop generating (Esc)"));
    m_regen = new QPushButton(QIcon(QStringLiteral(":/icons/regenerate.svg")), tr("Regenerate"));
    m_regen->setToolTip(tr("Regenerate the last answer (Ctrl+R)"));
    m_continue = new QPushButton(tr("Continue"));
    m_continue->setToolTip(tr("Generate more after the last answer (Ctrl+Shift+Return)"));
    m_edit = new QPushButton(tr("Edit last"));
    m_edit->setToolTip(tr("Put the last message back into the input to edit and resend (Ctrl+E)"));
    for (auto* b : {m_send, m_stop, m_regen, m_continue, m_edit}) buttons->addWidget(b);
    m_status = new QLabel;
    m_status->setObjectName(QStringLiteral("chatStatus"));
    m_status->setWordWrap(true);
    m_status->setSizePolicy(QSizePolicy::Ignored, QSizePolicy::Preferred);  // never widens the window
    buttons->addWidget(m_status, 1);
    lv->addLayout(buttons);
    split->addWidget(left);

    // Right: sampling settings.
    auto* box = new QGroupBox(tr("Sampling"));
    auto* form = new QFormLayout(box);
    auto dbl = [](double lo, double hi, double step, double v, int dec = 2) {
        auto* s = new QDoubleSpinBox;
        s->setRange(lo, hi);
        s->setSingleStep(step);
        s->setDecimals(dec);
        s->setValue(v);
        return s;
    };
    m_temp = dbl(0, 5, 0.05, 0.7);
    m_temp->setToolTip(tr("0: greedy"));
    m_topK = new QSpinBox;
    m_topK->setRange(0, 1000000);
    m_topK->setToolTip(tr("0: off"));
    m_topP = dbl(0, 1, 0.05, 1.0);
    m_minP = dbl(0, 1, 0.01, 0.0);
    m_rep = dbl(0.5, 3, 0.05, 1.0);
    m_freq = dbl(-2, 2, 0.1, 0.0);
    m_pres = dbl(-2, 2, 0.1, 0.0);
    m_seed = new QSpinBox;
    m_seed->setRange(0, INT_MAX);
    m_maxTokens = new QSpinBox;
    m_maxTokens->setRange(1, 100000);
    m_maxTokens->setValue(128);
    m_mtp = new QCheckBox(tr("MTP speculative decoding"));
    m_mtp->setChecked(true);
    m_stopEos = new QCheckBox(tr("Stop at end-of-sequence token"));
    m_stopEos->setObjectName(QStringLiteral("stopAtEos"));
    m_stopEos->setChecked(true);
    form->addRow(tr("Temperature"), m_temp);
    form->addRow(tr("Top-k"), m_topK);
    form->addRow(tr("Top-p"), m_topP);
    form->addRow(tr("Min-p"), m_minP);
    form->addRow(tr("Repetition penalty"), m_rep);
    form->addRow(tr("Frequency penalty"), m_freq);
    form->addRow(tr("Presence penalty"), m_pres);
    form->addRow(tr("Seed"), m_seed);
    form->addRow(tr("Max tokens"), m_maxTokens);
    form->addRow(m_mtp);
    form->addRow(m_stopEos);
    auto* scroll = new QScrollArea;
    scroll->setWidget(box);
    scroll->setWidgetResizable(true);
    scroll->setMinimumWidth(250);
    split->addWidget(scroll);
    split->setStretchFactor(0, 4);
    split->setStretchFactor(1, 1);

    m_renderTimer.setSingleShot(true);
    m_renderTimer.setInterval(40);
    connect(&m_renderTimer, &QTimer::timeout, this, &ChatWidget::render);

    connect(m_send, &QPushButton::clicked, this, [this] {
        if (send(m_input->toPlainText())) m_input->clear();
    });
    connect(m_stop, &QPushButton::clicked, this, &ChatWidget::stop);
    connect(m_regen, &QPushButton::clicked, this, &ChatWidget::regenerate);
    connect(m_continue, &QPushButton::clicked, this, &ChatWidget::continueGeneration);
    connect(m_edit, &QPushButton::clicked, this, &ChatWidget::editLast);
    auto* sc = new QShortcut(QKeySequence(Qt::CTRL | Qt::Key_Return), this);
    connect(sc, &QShortcut::activated, m_send, &QPushButton::click);
    sc = new QShortcut(QKeySequence(Qt::Key_Escape), this);
    connect(sc, &QShortcut::activated, this, &ChatWidget::stop);
    sc = new QShortcut(QKeySequence(Qt::CTRL | Qt::Key_R), this);
    connect(sc, &QShortcut::activated, this, &ChatWidget::regenerate);
    sc = new QShortcut(QKeySequence(Qt::CTRL | Qt::SHIFT | Qt::Key_Return), this);
    connect(sc, &QShortcut::activated, this, &ChatWidget::continueGeneration);
    sc = new QShortcut(QKeySequence(Qt::CTRL | Qt::Key_E), this);
    connect(sc, &QShortcut::activated, this, &ChatWidget::editLast);

    connect(m_view, &QTextBrowser::anchorClicked, this, [this](const QUrl& url) {
        const QString s = url.toString();
        if (s.startsWith(QStringLiteral("t:"))) m_store->select(s.mid(2).toInt());
    });
    connect(m_store, &TelemetryStore::selectionChanged, this, &ChatWidget::scheduleRender);
    connect(m_store, &TelemetryStore::changed, this, [this] {
        if (m_colouring->currentIndex() == int(Colouring::TopExpert)) scheduleRender();
    });
    connect(m_colouring, &QComboBox::currentIndexChanged, this, &ChatWidget::scheduleRender);
    connect(m_colourLayer, &QSpinBox::valueChanged, this, &ChatWidget::scheduleRender);

    connect(m_engine, &EngineController::tokenGenerated, this, [this](const GeneratedToken& t) {
        if (m_entries.empty() || m_entries.back().role != QLatin1String("assistant")) m_entries.push_back({QStringLiteral("assistant"), {}, {}, {}});
        m_entries.back().tokens.push_back(t);
        // The chat template closes an answer with its own end token: special tokens stay out of
        // the text the next turn is built from (they are still shown, dimmed, and clickable).
        if (!t.special) m_entries.back().text += t.text;
        setContextUsed(t.position + 1);
        scheduleRender();
    });
    connect(m_engine, &EngineController::generationFinished, this, [this](const GenerationSummary& s) {
        m_generating = false;
        if (!m_entries.empty() && m_entries.back().role == QLatin1String("assistant")) {
            auto& e = m_entries.back();
            if (e.summary) {  // a continuation: add up
                GenerationSummary merged = s;
                merged.tokens += e.summary->tokens;
                e.summary = merged;
            } else {
                e.summary = s;
            }
        }
        m_store->addGeneration(s);
        m_status->setText(tr("done (%1)").arg(s.stopReason));
        updateContextMeter();
        updateButtons();
        render();
    });
    connect(m_engine, &EngineController::generationFailed, this, [this](const QString& msg) {
        m_generating = false;
        // A turn that produced nothing (e.g. the prompt does not fit the context) leaves no empty answer.
        if (!m_entries.empty() && m_entries.back().role == QLatin1String("assistant") && m_entries.back().tokens.empty()) {
            m_entries.pop_back();
            // A new message that could not run goes back into the input, to be edited.
            if (m_sentNew && !m_entries.empty() && m_entries.back().role == QLatin1String("user")) {
                m_input->setPlainText(m_entries.back().text);
                m_entries.pop_back();
            }
        }
        m_status->setText(tr("error: %1").arg(msg));
        emit statusMessage(msg);
        updateContextMeter();
        updateButtons();
        render();
    });
    connect(m_engine, &EngineController::modelLoaded, this, [this](const ModelInfo& info) {
        m_context->setMaximum(std::max(1, info.contextCap));
        m_colourLayer->setRange(0, std::max(0, info.config.value("num_hidden_layers", 1) - 1));
        m_colourLayer->setValue(std::min(m_colourLayer->maximum(), info.config.value("first_k_dense_replace", 0)));
        m_input->setPlaceholderText(info.hasTokenizer ? tr("Message (Ctrl+Return to send)")
                                                      : tr("No tokenizer: type token ids, e.g. 5, 17, 42 (Ctrl+Return to send)"));
        updateContextMeter();
        updateButtons();
    });
    connect(m_engine, &EngineController::busyChanged, this, &ChatWidget::updateButtons);
    updateButtons();
}

SamplingParams ChatWidget::sampling() const {
    SamplingParams p;
    p.temperature = m_temp->value();
    p.top_k = m_topK->value();
    p.top_p = m_topP->value();
    p.min_p = m_minP->value();
    p.repetition_penalty = m_rep->value();
    p.frequency_penalty = m_freq->value();
    p.presence_penalty = m_pres->value();
    p.seed = uint64_t(m_seed->value());
    p.max_tokens = m_maxTokens->value();
    p.mtp = m_mtp->isChecked();
    if (m_stopEos->isChecked() && m_engine->info().eosId >= 0) p.stop_tokens = {m_engine->info().eosId};
    return p;
}

void ChatWidget::setSampling(const SamplingParams& p) {
    m_temp->setValue(p.temperature);
    m_topK->setValue(p.top_k);
    m_topP->setValue(p.top_p);
    m_minP->setValue(p.min_p);
    m_rep->setValue(p.repetition_penalty);
    m_freq->setValue(p.frequency_penalty);
    m_pres->setValue(p.presence_penalty);
    m_seed->setValue(int(p.seed));
    m_maxTokens->setValue(p.max_tokens);
    m_mtp->setChecked(p.mtp);
}

QJsonObject ChatWidget::settingsJson() const {
    const SamplingParams p = sampling();
    return QJsonObject{{"temperature", p.temperature}, {"top_k", p.top_k},
                       {"top_p", p.top_p}, {"min_p", p.min_p},
                       {"repetition_penalty", p.repetition_penalty}, {"frequency_penalty", p.frequency_penalty},
                       {"presence_penalty", p.presence_penalty}, {"seed", double(p.seed)},
                       {"max_tokens", p.max_tokens}, {"mtp", p.mtp}, {"stop_at_eos", m_stopEos->isChecked()},
                       {"colouring", m_colouring->currentIndex()}, {"colour_layer", m_colourLayer->value()}};
}

void ChatWidget::applySettingsJson(const QJsonObject& o) {
    SamplingParams p = sampling();
    p.temperature = o.value("temperature").toDouble(p.temperature);
    p.top_k = o.value("top_k").toInt(p.top_k);
    p.top_p = o.value("top_p").toDouble(p.top_p);
    p.min_p = o.value("min_p").toDouble(p.min_p);
    p.repetition_penalty = o.value("repetition_penalty").toDouble(p.repetition_penalty);
    p.frequency_penalty = o.value("frequency_penalty").toDouble(p.frequency_penalty);
    p.presence_penalty = o.value("presence_penalty").toDouble(p.presence_penalty);
    p.seed = uint64_t(o.value("seed").toDouble(double(p.seed)));
    p.max_tokens = o.value("max_tokens").toInt(p.max_tokens);
    p.mtp = o.value("mtp").toBool(p.mtp);
    setSampling(p);
    m_stopEos->setChecked(o.value("stop_at_eos").toBool(m_stopEos->isChecked()));
    m_colouring->setCurrentIndex(o.value("colouring").toInt(m_colouring->currentIndex()));
    m_colourLayer->setValue(o.value("colour_layer").toInt(m_colourLayer->value()));
}

void ChatWidget::setColouring(Colouring c, int layer) {
    m_colouring->setCurrentIndex(int(c));
    if (layer >= 0) m_colourLayer->setValue(layer);
    render();
}

void ChatWidget::setSystemPrompt(const QString& s) { m_system->setPlainText(s); }

void ChatWidget::setStopAtEos(bool on) { m_stopEos->setChecked(on); }

QString ChatWidget::statusText() const { return m_status->text(); }

std::vector<int> ChatWidget::parseIds(const QString& text, QString* error) const {
    std::vector<int> ids;
    const int V = m_engine->info().vocabSize;
    static const QRegularExpression sep(QStringLiteral("[\\s,;]+"));
    for (const QString& part : text.split(sep, Qt::SkipEmptyParts)) {
        bool ok = false;
        const int id = part.toInt(&ok);
        if (!ok || id < 0 || (V > 0 && id >= V)) {
            if (error) *error = tr("'%1' is not a token id in [0, %2): this model has no tokenizer, so prompts are token ids").arg(part).arg(V);
            return {};
        }
        ids.push_back(id);
    }
    return ids;
}

std::vector<int> ChatWidget::buildContext(QString* error) const {
    auto tok = m_engine->tokenizer();
    if (tok) {
        std::vector<ChatMessage> msgs;
        if (!m_system->toPlainText().trimmed().isEmpty()) msgs.push_back({"system", m_system->toPlainText().toStdString()});
        for (const auto& e : m_entries) msgs.push_back({e.role.toStdString(), e.text.toStdString()});
        const std::string text = tok->chat_template().apply_chat_template(msgs, true);
        return tok->encode(text, false, true);
    }
    std::vector<int> ids = parseIds(m_system->toPlainText(), error);
    if (error && !error->isEmpty()) return {};
    for (const auto& e : m_entries) {
        if (e.role == QLatin1String("assistant")) {
            for (const auto& t : e.tokens) ids.push_back(t.id);
        } else {
            std::vector<int> u = parseIds(e.text, error);
            if (error && !error->isEmpty()) return {};
            ids.insert(ids.end(), u.begin(), u.end());
        }
    }
    return ids;
}

void ChatWidget::startGeneration(const std::vector<int>& context) {
    m_generating = true;
    m_sentNew = false;
    m_store->beginMessage();
    m_status->setText(tr("generating..."));
    updateButtons();
    m_engine->generate(context, sampling());
    render();
}

bool ChatWidget::send(const QString& text) {
    if (!m_engine->isLoaded() || m_engine->isBusy() || text.trimmed().isEmpty()) {
        m_status->setText(!m_engine->isLoaded() ? tr("no model loaded") : m_engine->isBusy() ? tr("busy") : tr("nothing to send"));
        return false;
    }
    QString err;
    if (!m_engine->tokenizer()) {
        parseIds(text, &err);
        if (!err.isEmpty()) {
            m_status->setText(err);
            emit statusMessage(err);
            return false;
        }
    }
    m_entries.push_back({QStringLiteral("user"), text.trimmed(), {}, {}});
    std::vector<int> ctx = buildContext(&err);
    if (!err.isEmpty() || ctx.empty()) {
        m_entries.pop_back();
        m_status->setText(err.isEmpty() ? tr("empty prompt") : err);
        return false;
    }
    m_entries.push_back({QStringLiteral("assistant"), {}, {}, {}});
    startGeneration(ctx);
    m_sentNew = true;
    return true;
}

void ChatWidget::stop() {
    if (m_generating) m_engine->cancel();
}

void ChatWidget::regenerate() {
    if (m_engine->isBusy() || m_entries.empty()) return;
    if (m_entries.back().role == QLatin1String("assistant")) m_entries.pop_back();
    if (m_entries.empty() || m_entries.back().role != QLatin1String("user")) return;
    QString err;
    std::vector<int> ctx = buildContext(&err);
    if (ctx.empty()) return;
    m_entries.push_back({QStringLiteral("assistant"), {}, {}, {}});
    startGeneration(ctx);
}

void ChatWidget::continueGeneration() {
    if (m_engine->isBusy() || m_entries.empty() || m_entries.back().role != QLatin1String("assistant")) return;
    if (m_engine->contextTokens().empty()) return;
    startGeneration(m_engine->contextTokens());
}

void ChatWidget::editLast() {
    if (m_engine->isBusy()) return;
    while (!m_entries.empty() && m_entries.back().role == QLatin1String("assistant")) m_entries.pop_back();
    if (m_entries.empty()) return;
    m_input->setPlainText(m_entries.back().text);
    m_entries.pop_back();
    m_input->setFocus();
    render();
}

void ChatWidget::newConversation() {
    if (m_engine->isBusy()) return;
    m_entries.clear();
    render();
}

void ChatWidget::updateButtons() {
    const bool loaded = m_engine->isLoaded(), busy = m_engine->isBusy();
    m_send->setEnabled(loaded && !busy);
    m_stop->setEnabled(busy && m_generating);
    const bool haveAnswer = !m_entries.empty() && m_entries.back().role == QLatin1String("assistant");
    m_regen->setEnabled(loaded && !busy && haveAnswer);
    m_continue->setEnabled(loaded && !busy && haveAnswer);
    m_edit->setEnabled(!busy && !m_entries.empty());
}

void ChatWidget::updateContextMeter() {
    m_context->setMaximum(std::max(1, m_engine->info().contextCap));
    setContextUsed(int(m_engine->contextTokens().size()));
}

void ChatWidget::setContextUsed(int used) {
    m_context->setValue(std::min(m_context->maximum(), used));
    m_contextText->setText(tr("%1 / %2 tokens").arg(m_context->value()).arg(m_context->maximum()));
    const QString tip = tr("Context in use: %1 of the session's %2 positions").arg(m_context->value()).arg(m_context->maximum());
    m_context->setToolTip(tip);
    m_contextText->setToolTip(tip);
}

void ChatWidget::scheduleRender() {
    if (!m_renderTimer.isActive()) m_renderTimer.start();
}

QString ChatWidget::tokenStyle(const GeneratedToken& t) const {
    QColor bg;
    const bool darkPal = palette().color(QPalette::Base).lightness() < 128;
    switch (Colouring(m_colouring->currentIndex())) {
    case Colouring::TopExpert: {
        auto it = m_store->routes().find(t.position);
        if (it == m_store->routes().end()) break;
        const RouteRecord& r = it->second;
        for (size_t li = 0; li < r.layers.size(); ++li) {
            if (r.layers[li] != m_colourLayer->value()) continue;
            int best = 0;
            for (int j = 1; j < r.k; ++j)
                if (r.weights[li * size_t(r.k) + size_t(j)] > r.weights[li * size_t(r.k) + size_t(best)]) best = j;
            const int e = r.ids[li * size_t(r.k) + size_t(best)];
            // Golden-angle hues keep neighbouring expert ids apart.
            bg = QColor::fromHsv(int(e * 137.508) % 360, darkPal ? 160 : 80, darkPal ? 110 : 255);
        }
        break;
    }
    case Colouring::Mtp:
        bg = t.drafted ? QColor(darkPal ? QColor(40, 110, 60) : QColor(170, 230, 170)) : QColor();
        break;
    case Colouring::Surprisal: {
        const double a = std::clamp(double(t.surprisal) / 12.0, 0.0, 1.0);
        bg = darkPal ? QColor(int(40 + 160 * a), 40, 40) : QColor(255, int(255 - 170 * a), int(255 - 170 * a));
        break;
    }
    case Colouring::None:
        break;
    }
    QString style = QStringLiteral("text-decoration:none; color:%1;").arg(palette().color(QPalette::Text).name());
    if (t.position == m_store->selected()) {
        style += QStringLiteral("background-color:%1; color:%2; text-decoration:underline;")
                     .arg(palette().color(QPalette::Highlight).name(), palette().color(QPalette::HighlightedText).name());
    } else if (bg.isValid()) {
        style += QStringLiteral("background-color:%1;").arg(bg.name());
    }
    return style;
}

void ChatWidget::render() {
    QScrollBar* sb = m_view->verticalScrollBar();
    const bool atEnd = sb->value() >= sb->maximum() - 4;
    const int keep = sb->value();
    const bool noTok = !m_engine->tokenizer();
    QString html = QStringLiteral("<html><body style='white-space:pre-wrap'>");
    const QString dim = palette().color(QPalette::PlaceholderText).name();
    for (const auto& e : m_entries) {
        if (e.role == QLatin1String("user")) {
            html += QStringLiteral("<p><b>%1</b><br/>%2</p>").arg(tr("You"), e.text.toHtmlEscaped());
            continue;
        }
        html += QStringLiteral("<p><b>%1</b><br/>").arg(tr("Model"));
        for (const auto& t : e.tokens) {
            QString text = noTok || t.text.isEmpty() ? QStringLiteral("[%1] ").arg(t.id) : t.text;
            text = text.toHtmlEscaped();
            text.replace(QLatin1Char('\n'), QStringLiteral("<br/>"));
            QString style = tokenStyle(t);
            // Special tokens (the end token) are not part of the answer: small and dimmed, still a link.
            if (t.special && !noTok) {
                if (t.position != m_store->selected()) style += QStringLiteral("color:%1;").arg(dim);
                style += QStringLiteral("font-size:small;");
                text = QStringLiteral(" ") + text;
            }
            html += QStringLiteral("<a href='t:%1' style='%2'>%3</a>").arg(t.position).arg(style, text);
        }
        html += QStringLiteral("</p>");
        if (e.summary) {
            const auto& s = *e.summary;
            QString line = tr("%1 tokens · %2 tokens/s · first token %3 ms")
                               .arg(s.tokens)
                               .arg(s.tokensPerS, 0, 'f', 1)
                               .arg(s.ttft * 1000.0, 0, 'f', 0);
            if (s.mtp)
                line += tr(" · MTP acceptance %1% (%2/%3)").arg(100.0 * s.acceptance, 0, 'f', 0).arg(s.acceptedTokens).arg(s.draftTokens);
            else
                line += tr(" · MTP off");
            line += tr(" · stop: %1").arg(s.stopReason);
            if (!s.ablation.isEmpty()) line += tr(" · experts off: %1").arg(s.ablation);
            html += QStringLiteral("<p style='color:%1; font-size:small'>%2</p>").arg(dim, line.toHtmlEscaped());
        }
    }
    html += QStringLiteral("</body></html>");
    m_view->setHtml(html);
    sb->setValue(atEnd ? sb->maximum() : keep);
    updateButtons();
}

bool ChatWidget::saveConversation(const QString& path, QString* error) const {
    QJsonArray msgs;
    for (const auto& e : m_entries) {
        QJsonObject m{{"role", e.role}, {"text", e.text}};
        if (!e.tokens.empty()) {
            QJsonArray toks;
            for (const auto& t : e.tokens)
                toks.append(QJsonObject{{"id", t.id}, {"position", t.position}, {"text", t.text}, {"drafted", t.drafted},
                                        {"special", t.special}, {"surprisal", double(t.surprisal)}});
            m["tokens"] = toks;
        }
        if (e.summary) {
            const auto& s = *e.summary;
            QJsonObject stats{{"tokens", s.tokens}, {"tokens_per_s", s.tokensPerS}, {"ttft", s.ttft}, {"mtp", s.mtp},
                              {"draft_tokens", double(s.draftTokens)}, {"accepted_tokens", double(s.acceptedTokens)},
                              {"acceptance", s.acceptance}, {"stop_reason", s.stopReason}, {"prompt_tokens", s.promptTokens}};
            if (!s.ablation.isEmpty()) stats["experts_off"] = s.ablation;
            m["stats"] = stats;
        }
        msgs.append(m);
    }
    QJsonObject root{{"format", "moescope conversation v1"}, {"model", m_engine->info().dir},
                     {"system", m_system->toPlainText()}, {"sampling", settingsJson()}, {"messages", msgs}};
    QSaveFile f(path);
    if (!f.open(QIODevice::WriteOnly) || f.write(QJsonDocument(root).toJson()) < 0 || !f.commit()) {
        if (error) *error = QStringLiteral("%1: %2").arg(path, f.errorString());
        return false;
    }
    return true;
}

bool ChatWidget::openConversation(const QString& path, QString* error) {
    QFile f(path);
    if (!f.open(QIODevice::ReadOnly)) {
        if (error) *error = QStringLiteral("%1: %2").arg(path, f.errorString());
        return false;
    }
    QJsonParseError pe;
    const QJsonDocument doc = QJsonDocument::fromJson(f.readAll(), &pe);
    if (!doc.isObject() || doc.object().value("format").toString() != QLatin1String("moescope conversation v1")) {
        if (error) *error = tr("%1: not a moescope conversation (%2)").arg(path, pe.errorString());
        return false;
    }
    const QJsonObject root = doc.object();
    std::vector<ChatEntry> entries;
    for (const auto& v : root.value("messages").toArray()) {
        const QJsonObject m = v.toObject();
        ChatEntry e{m.value("role").toString(), m.value("text").toString(), {}, {}};
        for (const auto& tv : m.value("tokens").toArray()) {
            const QJsonObject t = tv.toObject();
            e.tokens.push_back({t.value("id").toInt(), t.value("position").toInt(), t.value("text").toString(),
                                t.value("drafted").toBool(), t.value("special").toBool(), float(t.value("surprisal").toDouble())});
        }
        if (m.contains("stats")) {
            const QJsonObject s = m.value("stats").toObject();
            GenerationSummary g;
            g.tokens = s.value("tokens").toInt();
            g.tokensPerS = s.value("tokens_per_s").toDouble();
            g.ttft = s.value("ttft").toDouble();
            g.mtp = s.value("mtp").toBool();
            g.draftTokens = qint64(s.value("draft_tokens").toDouble());
            g.acceptedTokens = qint64(s.value("accepted_tokens").toDouble());
            g.acceptance = s.value("acceptance").toDouble();
            g.stopReason = s.value("stop_reason").toString();
            g.promptTokens = s.value("prompt_tokens").toInt();
            g.ablation = s.value("experts_off").toString();
            e.summary = g;
        }
        entries.push_back(std::move(e));
    }
    m_entries = std::move(entries);
    m_system->setPlainText(root.value("system").toString());
    applySettingsJson(root.value("sampling").toObject());
    render();
    return true;
}
