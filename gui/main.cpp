// moescope: the desktop explorer. Command line:
//   moescope [--model DIR] [--trace FILE.jsonl]
//            [--screenshot FILE.png [--view NAME] [--prompt TEXT]... [--max-tokens N] [--seed N] [--mtp-off-turns N] [--dark]
//             [--colour expert|mtp|surprisal] [--online-balancing GAMMA] [--disable-experts SPEC]
//             [--drop-top-experts R] [--evaluate FILE [--eval-windows N] [--eval-sweep top|layers]]
//             [--train tiny|small --corpus FILE... --steps N]] [--export DIR]
// --export writes every view's PNG, PDF and CSV and the session's telemetry.jsonl into DIR.
// --screenshot renders the window (works under QT_QPA_PLATFORM=offscreen) after loading and,
// with --prompt, after generating, then exits (0 on success).
#include <QApplication>
#include <QCommandLineParser>
#include <QDir>
#include <QTimer>

#include <cstdio>

#include "ChatWidget.h"
#include "EngineController.h"
#include "MainWindow.h"
#include "TelemetryStore.h"
#include "TrainerRunner.h"
#include "views/BiasView.h"
#include "views/EvaluateView.h"
#include "views/TrainingView.h"
#include "views/PlotView.h"

int main(int argc, char** argv) {
    QApplication::setHighDpiScaleFactorRoundingPolicy(Qt::HighDpiScaleFactorRoundingPolicy::PassThrough);
    QApplication app(argc, argv);
    QApplication::setOrganizationName(QStringLiteral("moescope"));
    QApplication::setApplicationName(QStringLiteral("moescope"));
    QApplication::setApplicationVersion(QStringLiteral(MOESCOPE_VERSION_STRING));
    QApplication::setStyle(QStringLiteral("Fusion"));

    QCommandLineParser cli;
    cli.setApplicationDescription(QStringLiteral("moescope: an explorer for DeepSeek-V3-family MoE models"));
    cli.addHelpOption();
    cli.addVersionOption();
    QCommandLineOption model({QStringLiteral("m"), QStringLiteral("model")}, QStringLiteral("Model folder to open."), QStringLiteral("DIR"));
    QCommandLineOption trace(QStringLiteral("trace"), QStringLiteral("Telemetry trace (JSONL) to replay at start."), QStringLiteral("FILE"));
    QCommandLineOption shot(QStringLiteral("screenshot"), QStringLiteral("Render the window to FILE.png and exit."), QStringLiteral("FILE"));
    QCommandLineOption view(QStringLiteral("view"), QStringLiteral("View to raise: routing, latent, mtp, experts, bias, training, card."), QStringLiteral("NAME"));
    QCommandLineOption prompt(QStringLiteral("prompt"), QStringLiteral("Prompt to send before the screenshot (token ids without a tokenizer); repeat it for more turns."), QStringLiteral("TEXT"));
    QCommandLineOption train(QStringLiteral("train"), QStringLiteral("Start a training run on this preset (tiny, small) after loading; the screenshot waits for it."), QStringLiteral("PRESET"));
    QCommandLineOption corpus(QStringLiteral("corpus"), QStringLiteral("Corpus text file for --train (repeatable)."), QStringLiteral("FILE"));
    QCommandLineOption steps(QStringLiteral("steps"), QStringLiteral("Steps for --train."), QStringLiteral("N"));
    QCommandLineOption noMtpTurns(QStringLiteral("mtp-off-turns"), QStringLiteral("Answer the first N prompts with MTP off."), QStringLiteral("N"));
    QCommandLineOption seed(QStringLiteral("seed"), QStringLiteral("Sampling seed for --prompt."), QStringLiteral("N"));
    QCommandLineOption maxTokens(QStringLiteral("max-tokens"), QStringLiteral("Tokens to generate for --prompt."), QStringLiteral("N"));
    QCommandLineOption dark(QStringLiteral("dark"), QStringLiteral("Dark palette."));
    QCommandLineOption exportDir(QStringLiteral("export"), QStringLiteral("Export every view (PNG, PDF, CSV) and the telemetry (JSONL) into DIR and exit."), QStringLiteral("DIR"));
    QCommandLineOption balance(QStringLiteral("online-balancing"), QStringLiteral("Turn on aux-loss-free online balancing with this gamma."), QStringLiteral("GAMMA"));
    QCommandLineOption colour(QStringLiteral("colour"), QStringLiteral("Token colouring: expert, mtp, surprisal."), QStringLiteral("MODE"));
    QCommandLineOption backend(QStringLiteral("backend"), QStringLiteral("Backend: auto (the GPU when available), cpu or cuda."), QStringLiteral("NAME"));
    QCommandLineOption disable(QStringLiteral("disable-experts"), QStringLiteral("Switch routed experts off after loading (an ablation): LAYER:EXPERTS, e.g. 1:3,7;2:0-3 or *:5."), QStringLiteral("SPEC"));
    QCommandLineOption dropTop(QStringLiteral("drop-top-experts"), QStringLiteral("Switch each token's R highest-ranked experts off for it in every MoE layer (DeepSeekMoE's redundancy test)."), QStringLiteral("R"));
    QCommandLineOption evalText(QStringLiteral("evaluate"), QStringLiteral("Score a held-out text file after loading (the Evaluate view): perplexity with every expert on and with the ablation set."), QStringLiteral("FILE"));
    QCommandLineOption evalSweep(QStringLiteral("eval-sweep"), QStringLiteral("With --evaluate: also a sweep of Top off, over R (top) or one MoE layer at a time (layers), or each routed expert of MoE layer L switched off alone (experts:L)."), QStringLiteral("top|layers|experts:L"));
    QCommandLineOption evalWindows(QStringLiteral("eval-windows"), QStringLiteral("Windows of the --evaluate text to score (default 8, 0: all)."), QStringLiteral("N"));
    cli.addOptions({backend, model, trace, shot, view, prompt, maxTokens, seed, dark, colour, balance, disable, dropTop, evalText, evalWindows, evalSweep, exportDir, train, corpus, steps, noMtpTurns});
    cli.process(app);

    const bool screenshot = cli.isSet(shot) || cli.isSet(exportDir);
    MainWindow w(!screenshot);
    if (cli.isSet(dark)) w.setDark(true);
    if (cli.isSet(backend)) w.setBackendRequest(cli.value(backend));
    if (cli.isSet(view) && !w.showView(cli.value(view))) {
        std::fprintf(stderr, "moescope: unknown view '%s'\n", qPrintable(cli.value(view)));
        return 2;
    }
    if (screenshot) w.resize(1600, 1000);  // before the first show, which sizes the docks to the window
    w.show();

    int exitCode = 0;
    auto finish = [&](const QString& why) {
        if (!why.isEmpty()) {
            std::fprintf(stderr, "moescope: %s\n", qPrintable(why));
            exitCode = 1;
        }
        if (!screenshot) return;
        QTimer::singleShot(150, &app, [&] {
            w.store()->flush();
            for (auto* v : w.views()) v->refreshNow();
            QApplication::processEvents();
            if (cli.isSet(exportDir)) {
                QString err;
                const QString dir = cli.value(exportDir);
                if (!w.exportAllViews(dir, &err) || !w.saveTelemetry(QDir(dir).filePath(QStringLiteral("telemetry.jsonl")), &err)) {
                    std::fprintf(stderr, "moescope: %s\n", qPrintable(err));
                    exitCode = 1;
                } else {
                    std::printf("exported every view into %s\n", qPrintable(dir));
                }
            }
            const QString path = cli.value(shot);
            if (path.isEmpty()) {
                app.exit(exitCode);
                return;
            }
            if (!w.grab().save(path)) {
                std::fprintf(stderr, "moescope: could not write %s\n", qPrintable(path));
                exitCode = 1;
            } else {
                std::printf("wrote %s\n", qPrintable(path));
            }
            app.exit(exitCode);
        });
    };

    if (screenshot) {
        QTimer::singleShot(600000, &app, [&] { finish(QStringLiteral("timed out")); });
    }
    // Each --prompt is one user turn, sent when the previous answer is complete.
    const QStringList prompts = cli.values(prompt);
    int sent = 0;
    const int mtpOff = cli.isSet(noMtpTurns) ? cli.value(noMtpTurns).toInt() : 0;
    auto sendNext = [&] {
        auto sp = w.chat()->sampling();
        sp.mtp = sent >= mtpOff;  // the first --mtp-off-turns answers without MTP (the MTP view's speed comparison)
        w.chat()->setSampling(sp);
        const QString p = prompts.value(sent++);
        if (!w.chat()->send(p)) finish(QStringLiteral("could not send the prompt: ") + w.chat()->statusText());
    };
    auto startPrompts = [&] {
        if (!cli.isSet(prompt)) {
            finish(QString());
            return;
        }
        auto s = w.chat()->sampling();
        if (cli.isSet(maxTokens)) s.max_tokens = cli.value(maxTokens).toInt();
        if (cli.isSet(seed)) s.seed = cli.value(seed).toULongLong();
        w.chat()->setSampling(s);
        sendNext();
    };
    auto afterLoad = [&] {
        if (cli.isSet(colour)) {
            const QString c = cli.value(colour);
            w.chat()->setColouring(c == QLatin1String("mtp") ? ChatWidget::Colouring::Mtp
                                   : c == QLatin1String("surprisal") ? ChatWidget::Colouring::Surprisal
                                                                     : ChatWidget::Colouring::TopExpert);
        }
        if (cli.isSet(balance))
            if (auto* b = qobject_cast<BiasView*>(w.view(QStringLiteral("bias")))) b->setOnlineBalancing(true, cli.value(balance).toDouble());
        if (cli.isSet(train)) {
            auto* tv = qobject_cast<TrainingView*>(w.view(QStringLiteral("training")));
            QString err;
            if (!w.engineTrainer()) finish(QStringLiteral("this build has no trainer"));
            else if (!tv->startTraining(cli.value(train), cli.values(corpus), cli.isSet(steps) ? cli.value(steps).toInt() : 100, &err))
                finish(QStringLiteral("could not start training: ") + err);
            return;  // the screenshot follows the run's end
        }
        if (cli.isSet(evalText)) {  // scored first; the prompts follow the report
            auto* ev = qobject_cast<EvaluateView*>(w.view(QStringLiteral("evaluate")));
            ev->setTextPath(cli.value(evalText));
            if (cli.isSet(evalWindows)) ev->setWindows(cli.value(evalWindows).toInt());
            if (cli.isSet(evalSweep)) {
                const QString sw = cli.value(evalSweep);
                if (sw.startsWith(QLatin1String("experts:"))) {
                    ev->setSweep(EvalSweep::PerExpert);
                    ev->setExpertLayer(sw.mid(8).toInt());
                } else {
                    ev->setSweep(sw == QLatin1String("layers") ? EvalSweep::PerLayer : EvalSweep::TopR);
                }
            }
            ev->run();
            return;
        }
        startPrompts();
    };
    QObject::connect(w.engine(), &EngineController::generationFinished, &app, [&] {
        if (sent < prompts.size()) {
            QTimer::singleShot(0, &app, sendNext);  // after the chat has taken the answer in
            return;
        }
        // Select a token in the middle of the answer so the routing view shows one.
        const auto& es = w.chat()->entries();
        if (!es.empty() && !es.back().tokens.empty()) w.store()->select(es.back().tokens[es.back().tokens.size() / 2].position);
        finish(QString());
    });
    if (w.engineTrainer()) {
        QObject::connect(w.engineTrainer(), &TrainerRunner::finished, &app, [&] {
            if (cli.isSet(train)) finish(QString());
        });
        QObject::connect(w.engineTrainer(), &TrainerRunner::failed, &app, [&](const QString& m) {
            if (cli.isSet(train)) finish(m);
        });
    }
    QObject::connect(w.engine(), &EngineController::generationFailed, &app, [&](const QString& m) { finish(m); });
    QObject::connect(w.engine(), &EngineController::evaluationFinished, &app, [&] {
        if (cli.isSet(evalText)) QTimer::singleShot(0, &app, startPrompts);  // once the engine is idle again
    });
    QObject::connect(w.engine(), &EngineController::evaluationFailed, &app, [&](const QString& m) {
        if (cli.isSet(evalText)) finish(QStringLiteral("could not score the text: ") + m);
    });

    if (cli.isSet(trace)) {
        QString err;
        if (!w.openTrace(cli.value(trace), &err)) {
            std::fprintf(stderr, "moescope: %s\n", qPrintable(err));
            if (screenshot) return 1;
        }
        if (screenshot && !cli.isSet(model)) {
            finish(QString());
            return app.exec() ? 1 : exitCode;
        }
    }
    QObject::connect(w.engine(), &EngineController::modelLoaded, &app, [&] {
        // Posted before any prompt: the engine runs its jobs in order.
        if (cli.isSet(disable)) w.engine()->setDisabledExperts(-1, cli.value(disable));
        if (cli.isSet(dropTop)) {
            bool ok = false;
            const int r = cli.value(dropTop).toInt(&ok);
            w.engine()->setDropTopExperts(ok ? r : -1);  // not a number: refused, the refusal says why
        }
        if (screenshot || cli.isSet(prompt)) afterLoad();
    });
    QObject::connect(w.engine(), &EngineController::ablationFailed, &app, [&](const QString& m) {
        if (screenshot) finish(m);
        else std::fprintf(stderr, "moescope: %s\n", qPrintable(m));
    });
    QObject::connect(w.engine(), &EngineController::loadFailed, &app, [&](const QString&, const QString& m) {
        if (screenshot) finish(m);
    });
    if (!cli.isSet(trace) || cli.isSet(model)) {
        if (cli.isSet(model)) w.openModel(cli.value(model));
        else w.openDefaultModel();
    }
    const int rc = app.exec();
    return rc ? rc : exitCode;
}
