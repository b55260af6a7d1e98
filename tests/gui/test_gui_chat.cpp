// The explorer end to end on the tiny-v3 fixture (no tokenizer: prompts are token ids): a chat
// round-trip feeds the routing, latent and MTP views; clicking a token selects it everywhere;
// stop mid-generation leaves a consistent conversation; a broken model folder reports the
// engine's error and keeps the previous model working.
#include <QCheckBox>
#include <QDir>
#include <QPlainTextEdit>
#include <QFile>
#include <QTemporaryDir>
#include <QTextBlock>
#include <QTextBrowser>

#include "engine/tokenizer/tokenizer.h"
#include "gui_test_util.h"
#include "views/LatentView.h"
#include "views/MtpView.h"
#include "views/RoutingView.h"

using namespace moescope;

class TestGuiChat : public QObject {
    Q_OBJECT
    MainWindow* w = nullptr;
    RoutingView* routing() { return qobject_cast<RoutingView*>(w->view("routing")); }
    LatentView* latent() { return qobject_cast<LatentView*>(w->view("latent")); }
    MtpView* mtp() { return qobject_cast<MtpView*>(w->view("mtp")); }

    // The widget point of the generated token at `position` in the conversation.
    bool tokenPoint(int position, QPoint* at) {
        QTextBrowser* b = w->chat()->browser();
        const QString href = QStringLiteral("t:%1").arg(position);
        for (QTextBlock blk = b->document()->begin(); blk.isValid(); blk = blk.next())
            for (auto it = blk.begin(); !it.atEnd(); ++it) {
                const QTextFragment f = it.fragment();
                if (f.charFormat().anchorHref() != href) continue;
                QTextCursor c(b->document());
                c.setPosition(f.position() + std::max(1, f.length() / 2));
                *at = b->cursorRect(c).center() - QPoint(2, 0);
                return true;
            }
        return false;
    }

private slots:
    void initTestCase() {
        w = fixtureWindow();
        QVERIFY(w);
        QCOMPARE(w->engine()->info().config.value("n_routed_experts", 0), 16);
        QVERIFY2(w->backendText().contains(QStringLiteral("cpu")), qPrintable(w->backendText()));
        QVERIFY(!w->bannerText().isEmpty());  // CPU-only build: the notice says why
        w->chat()->setStopAtEos(false);
    }
    void cleanupTestCase() { delete w; }

    void roundTripFeedsViews() {
        routing()->refreshNow();  // before any token: the grey map is not "groups dropped"
        QCOMPARE(routing()->tokenMapTitle(), QStringLiteral("selected token: none yet"));
        QSignalSpy routingRefreshed(routing(), &PlotView::refreshed);
        GenerationSummary sum;
        QVERIFY(generateOnce(*w, QStringLiteral("5, 17, 42, 100, 7, 300, 12"), 10, &sum));
        QCOMPARE(sum.tokens, 10);
        routing()->refreshNow();
        QCOMPARE(routing()->tokenMapTitle(), QStringLiteral("selected token (grey: group dropped)"));
        QVERIFY(sum.mtp);
        QVERIFY(sum.draftTokens > 0);
        const std::vector<int>& ctx = w->engine()->contextTokens();
        QCOMPARE(int(ctx.size()), 7 + 10);
        const auto& entries = w->chat()->entries();
        QCOMPARE(int(entries.size()), 2);
        QCOMPARE(int(entries.back().tokens.size()), 10);
        for (size_t i = 0; i < 10; ++i) QCOMPARE(entries.back().tokens[i].id, ctx[7 + i]);

        // The store holds one token, route and latent record per position.
        TelemetryStore* st = w->store();
        QCOMPARE(int(st->tokens().size()), int(ctx.size()));
        QCOMPARE(int(st->routes().size()), int(ctx.size()));
        QCOMPARE(int(st->latents().size()), int(ctx.size()));
        for (const auto& [pos, t] : st->tokens()) QCOMPARE(t.id, ctx[size_t(pos)]);

        w->showView("routing");
        QTest::qWait(50);
        QVERIFY(routingRefreshed.count() > 0);
        routing()->refreshNow();
        QCOMPARE(routing()->tokenMapSize(), QSize(16, 3));           // experts x MoE layers 1..3
        QCOMPARE(routing()->sequenceMapSize(), QSize(int(ctx.size()), 16));
        QCOMPARE(routing()->loadBarCount(), 16);
        QCOMPARE(routing()->coactivationSize(), QSize(16, 16));

        w->showView("latent");
        latent()->refreshNow();
        QCOMPARE(latent()->latentMapSize(), QSize(int(ctx.size()), 32));  // kv_lora_rank
        QCOMPARE(latent()->kpeMapSize(), QSize(int(ctx.size()), 16));     // qk_rope_head_dim
        QCOMPARE(latent()->normMapSize(), QSize(int(ctx.size()), 4));     // layers
        QCOMPARE(latent()->memoryPoints(), 65);

        w->showView("mtp");
        mtp()->refreshNow();
        QCOMPARE(mtp()->ratePoints(), int(st->mtp().size()));
        QVERIFY(mtp()->ratePoints() > 0);
        QCOMPARE(mtp()->histogramBins(), 2);  // 0 or 1 accepted (one MTP module)
        QCOMPARE(mtp()->positionBars(), 1);
        QCOMPARE(mtp()->speedBars(), 2);
    }

    // Views in a tab behind another skip redraws while tokens arrive and catch up when raised.
    void hiddenTabsCatchUpWhenRaised() {
        w->showView("latent");  // routing and MTP share its dock area: their tabs are behind
        QTest::qWait(20);
        QVERIFY(latent()->isOnScreen());
        QVERIFY(!routing()->isOnScreen());
        QSignalSpy routingRefreshed(routing(), &PlotView::refreshed), latentRefreshed(latent(), &PlotView::refreshed);
        QVERIFY(generateOnce(*w, QStringLiteral("3, 9, 27"), 6));
        QTest::qWait(20);
        QVERIFY(latentRefreshed.count() > 0);
        QCOMPARE(routingRefreshed.count(), 0);
        QVERIFY(routing()->isDirty());
        w->showView("routing");
        QTRY_VERIFY(routingRefreshed.count() > 0);
        QVERIFY(!routing()->isDirty());
        routing()->refreshNow();  // what it drew is the whole sequence
        QCOMPARE(routing()->sequenceMapSize().width(), int(w->engine()->contextTokens().size()));
    }

    void clickingTokenSelectsEverywhere() {
        const auto& toks = w->chat()->entries().back().tokens;
        QVERIFY(toks.size() >= 4);
        w->showView("routing");
        for (int pick : {1, 3}) {
            const int pos = toks[size_t(pick)].position;
            QPoint at;
            QVERIFY(tokenPoint(pos, &at));
            QSignalSpy sel(w->store(), &TelemetryStore::selectionChanged);
            QTest::mouseClick(w->chat()->browser()->viewport(), Qt::LeftButton, {}, at);
            QCOMPARE(sel.count(), 1);
            QCOMPARE(w->store()->selected(), pos);
            // The routing heatmap now shows exactly that token's weights.
            routing()->refreshNow();
            const RouteRecord& r = w->store()->routes().at(pos);
            for (size_t li = 0; li < r.layers.size(); ++li)
                for (int j = 0; j < r.k; ++j)
                    QCOMPARE(routing()->tokenMapValue(r.ids[li * size_t(r.k) + size_t(j)], int(li)),
                             double(r.weights[li * size_t(r.k) + size_t(j)]));
            // The chat marks it too.
            QTest::qWait(60);
            QVERIFY(w->chat()->browser()->toHtml().contains(QStringLiteral("t:%1").arg(pos)));
        }
    }

    void routerScoresOnRequest() {
        auto* scores = routing()->findChild<QCheckBox*>("routingScores");
        QVERIFY(scores);
        scores->setChecked(true);
        QVERIFY(generateOnce(*w, QStringLiteral("11, 12"), 3));
        const int pos = w->chat()->entries().back().tokens.back().position;
        w->store()->select(pos);
        routing()->refreshNow();
        const RouteRecord& r = w->store()->routes().at(pos);
        QCOMPARE(int(r.scores.size()), int(r.layers.size()) * 16);
        int shown = 0;
        for (size_t li = 0; li < r.layers.size(); ++li)
            for (int e = 0; e < 16; ++e) {
                const double v = routing()->tokenMapValue(e, int(li));
                if (std::isnan(v)) continue;  // a dropped group
                QCOMPARE(v, double(r.scores[li * 16 + size_t(e)]));
                ++shown;
            }
        QCOMPARE(shown, int(r.layers.size()) * 8);  // topk_group 2 of 4 groups of 4 experts kept
        scores->setChecked(false);
    }

    void regenerateIsDeterministicWhenGreedy() {
        std::vector<int> before;
        for (const auto& t : w->chat()->entries().back().tokens) before.push_back(t.id);
        const size_t turns = w->chat()->entries().size();
        QSignalSpy done(w->engine(), &EngineController::generationFinished);
        w->chat()->regenerate();
        QVERIFY(done.wait(60000));
        std::vector<int> after;
        for (const auto& t : w->chat()->entries().back().tokens) after.push_back(t.id);
        QCOMPARE(after, before);
        QCOMPARE(w->chat()->entries().size(), turns);
    }

    void stopMidGenerationIsConsistent() {
        auto p = w->chat()->sampling();
        p.temperature = 1.0;
        p.max_tokens = 200;
        w->chat()->setSampling(p);
        int seen = 0;
        auto c = connect(w->engine(), &EngineController::tokenGenerated, this, [&] {
            if (++seen == 3) w->chat()->stop();
        });
        QSignalSpy done(w->engine(), &EngineController::generationFinished);
        QVERIFY(w->chat()->send(QStringLiteral("9, 8, 7")));
        QVERIFY(done.wait(60000));
        disconnect(c);
        w->store()->flush();
        const auto sum = done.first().first().value<GenerationSummary>();
        QCOMPARE(sum.stopReason, QStringLiteral("cancelled"));
        const auto& entries = w->chat()->entries();
        QCOMPARE(entries.back().role, QStringLiteral("assistant"));
        const auto& answer = entries.back().tokens;
        QVERIFY(answer.size() >= 3 && answer.size() < 200);
        // Conversation, session context and telemetry agree position by position.
        const std::vector<int>& ctx = w->engine()->contextTokens();
        QVERIFY(ctx.size() >= answer.size());
        for (size_t i = 0; i < answer.size(); ++i) {
            QCOMPARE(answer[i].position, int(ctx.size() - answer.size() + i));
            QCOMPARE(answer[i].id, ctx[ctx.size() - answer.size() + i]);
        }
        QCOMPARE(int(w->store()->tokens().size()), int(ctx.size()));
        QCOMPARE(int(w->store()->routes().size()), int(ctx.size()));
        // And the next turn works from there.
        GenerationSummary next;
        QVERIFY(generateOnce(*w, QStringLiteral("4, 4"), 4, &next));
        QCOMPARE(next.tokens, 4);
        QCOMPARE(int(w->store()->tokens().size()), int(w->engine()->contextTokens().size()));
    }

    void promptPastContextIsReported() {
        const size_t turns = w->chat()->entries().size();
        QStringList ids;
        for (int i = 0; i < 300; ++i) ids << QString::number(i % 500);  // the context holds 256
        QSignalSpy failed(w->engine(), &EngineController::generationFailed);
        QVERIFY(w->chat()->send(ids.join(", ")));
        QVERIFY(failed.wait(30000));
        QVERIFY2(failed.first().first().toString().contains(QStringLiteral("context")), qPrintable(failed.first().first().toString()));
        QCOMPARE(w->chat()->entries().size(), turns);               // nothing half-done in the conversation
        QCOMPARE(w->chat()->input()->toPlainText(), ids.join(", "));  // the message is back for editing
        w->chat()->input()->clear();
        GenerationSummary s;
        QVERIFY(generateOnce(*w, QStringLiteral("2, 3"), 2, &s));
        QCOMPARE(s.tokens, 2);
    }

    void conversationSavesAndReopens() {
        QTemporaryDir dir;
        const QString f = dir.filePath("chat.json");
        QString err;
        QVERIFY2(w->chat()->saveConversation(f, &err), qPrintable(err));
        const auto before = w->chat()->entries();
        w->chat()->newConversation();
        QCOMPARE(int(w->chat()->entries().size()), 0);
        QVERIFY2(w->chat()->openConversation(f, &err), qPrintable(err));
        const auto& after = w->chat()->entries();
        QCOMPARE(after.size(), before.size());
        for (size_t i = 0; i < after.size(); ++i) {
            QCOMPARE(after[i].role, before[i].role);
            QCOMPARE(after[i].text, before[i].text);
            QCOMPARE(after[i].tokens.size(), before[i].tokens.size());
            for (size_t j = 0; j < after[i].tokens.size(); ++j) QCOMPARE(after[i].tokens[j].id, before[i].tokens[j].id);
        }
    }

    void brokenModelKeepsPrevious() {
        QTemporaryDir dir;
        QVERIFY(QFile::copy(fixtureModel() + "/config.json", dir.filePath("config.json")));
        QFile src(fixtureModel() + "/model.safetensors");
        QVERIFY(src.open(QIODevice::ReadOnly));
        QFile dst(dir.filePath("model.safetensors"));
        QVERIFY(dst.open(QIODevice::WriteOnly));
        dst.write(src.read(4096));  // header intact, tensor data cut off
        dst.close();
        QSignalSpy failed(w->engine(), &EngineController::loadFailed);
        w->openModel(dir.path());
        QVERIFY(failed.wait(30000));
        const QString msg = failed.first().at(1).toString();
        QVERIFY(!msg.isEmpty());
        QVERIFY2(w->bannerText().contains(msg.toHtmlEscaped().left(40)) || w->bannerText().contains(msg.left(40)), qPrintable(w->bannerText()));
        QCOMPARE(w->engine()->info().dir, fixtureModel());
        GenerationSummary s;
        QVERIFY(generateOnce(*w, QStringLiteral("1, 2, 3"), 3, &s));
        QCOMPARE(s.tokens, 3);
    }

    void tokenizerFolderChatsInText() {
        // tiny-v3's weights with a 261-token byte-level tokenizer (ids fit its 512-token vocabulary).
        QTemporaryDir dir;
        QVERIFY(QFile::copy(fixtureModel() + "/config.json", dir.filePath("config.json")));
        QVERIFY(QFile::link(fixtureModel() + "/model.safetensors", dir.filePath("model.safetensors")));
        QVERIFY(QFile::copy(QStringLiteral(MOESCOPE_FIXTURES "/tokenizers/byte_level/tokenizer.json"), dir.filePath("tokenizer.json")));
        QSignalSpy loaded(w->engine(), &EngineController::modelLoaded);
        w->openModel(dir.path());
        QVERIFY(loaded.wait(60000));
        QVERIFY(w->engine()->info().hasTokenizer);
        auto tok = w->engine()->tokenizer();
        QVERIFY(tok);
        GenerationSummary s;
        QVERIFY(generateOnce(*w, QStringLiteral("Which expert?"), 5, &s));
        QCOMPARE(s.tokens, 5);
        // The prompt is the chat template applied to the conversation, encoded by the tokenizer.
        const std::string text = tok->chat_template().apply_chat_template({{"user", "Which expert?"}}, true);
        const std::vector<int> ids = tok->encode(text, false, true);
        std::vector<int> prompt;
        for (const auto& [pos, t] : w->store()->tokens())
            if (t.prompt) prompt.push_back(t.id);
        QCOMPARE(prompt, ids);
        QCOMPARE(w->chat()->entries().front().text, QStringLiteral("Which expert?"));
        QVERIFY(!w->bannerText().contains(QStringLiteral("prompts are token ids")));
    }
};

QTEST_MAIN(TestGuiChat)
#include "test_gui_chat.moc"
