// Shared helpers of the GUI suites: open the fixture model in a window and run one generation.
#pragma once
#include <QSignalSpy>
#include <QTest>

#include "ChatWidget.h"
#include "EngineController.h"
#include "MainWindow.h"
#include "TelemetryStore.h"

inline QString fixtureModel() { return QStringLiteral(MOESCOPE_FIXTURES "/tiny-v3"); }

inline bool loadFixture(MainWindow& w) {
    QSignalSpy loaded(w.engine(), &EngineController::modelLoaded);
    w.openModel(fixtureModel());
    return loaded.wait(60000) || loaded.count() == 1;
}

// A 1400 x 900 window on screen with the fixture loaded; nullptr when either failed.
inline MainWindow* fixtureWindow() {
    auto* w = new MainWindow(false);
    w->resize(1400, 900);
    w->show();
    if (!QTest::qWaitForWindowExposed(w) || !loadFixture(*w)) {
        delete w;
        return nullptr;
    }
    return w;
}

// Sends `prompt` (token ids) greedily and waits for the answer; returns the summary.
inline bool generateOnce(MainWindow& w, const QString& prompt, int maxTokens, GenerationSummary* out = nullptr,
                         bool mtp = true) {
    auto p = w.chat()->sampling();
    p.temperature = 0;
    p.max_tokens = maxTokens;
    p.mtp = mtp;
    w.chat()->setSampling(p);
    QSignalSpy done(w.engine(), &EngineController::generationFinished);
    if (!w.chat()->send(prompt)) return false;
    if (!done.wait(60000) && done.isEmpty()) return false;
    w.store()->flush();
    if (out) *out = done.first().first().value<GenerationSummary>();
    return true;
}
