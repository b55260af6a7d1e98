// Host-side logic of the CUDA backend, tested without a GPU: the device memory plan (the
// tensors it uploads against the model card and the loaded checkpoint, arena sizes), the
// refusal of a model that does not fit, and backend selection falling back to the CPU.
#include <QProcess>
#include <QtTest>

#include <dlfcn.h>

#include <cmath>
#include <filesystem>

#include "engine/backend.h"
#include "engine/config.h"
#include "engine/errors.h"
#include "engine/loader.h"
#include "engine/weights.h"
#include "kernels/memory_plan.h"

using namespace moescope;
using namespace moescope::cuda;

namespace {

const std::string kFixtures = MOESCOPE_FIXTURES;

ModelConfig load_cfg(const QString& name) {
    if (name == "tiny-v3") return ModelConfig::load(kFixtures + "/tiny-v3");
    return ModelConfig::load(kFixtures + "/configs/" + name.toStdString() + ".json");
}

int64_t elements(const std::vector<TensorSpec>& s) {
    int64_t n = 0;
    for (const auto& t : s) n += t.rows * t.cols;
    return n;
}

int64_t bias_elements(const ModelConfig& c) {
    if (!c.has_bias()) return 0;
    int moe = c.num_moe_layers() + c.num_nextn_predict_layers;
    return int64_t(moe) * c.n_routed_experts;
}

std::string cuda_library_path() {
    return std::string(MOESCOPE_BINARY_DIR) + "/kernels/libmoescope_cuda.so";
}

}  // namespace

class TestCudaHost : public QObject {
    Q_OBJECT
private slots:
    // Every parameter of the model card is on the device exactly once (the router bias lives
    // in its own mutable buffer), for real configs with MTP copies of embedding and head.
    void device_tensors_cover_model_card_data() {
        QTest::addColumn<QString>("config");
        QTest::newRow("deepseek-v3") << "deepseek-v3";
        QTest::newRow("deepseek-v2-lite") << "deepseek-v2-lite";
        QTest::newRow("tiny-v3") << "tiny-v3";
    }
    void device_tensors_cover_model_card() {
        QFETCH(QString, config);
        ModelConfig c = load_cfg(config);
        ModelCard card = model_card(c);
        ModelPresence p;
        p.lm_head = !c.tie_word_embeddings;
        p.mtp_embed = p.mtp_head = true;
        QCOMPARE(elements(device_tensors(c, p)), card.total_params + card.mtp_params - bias_elements(c));
    }

    // The plan walks the same tensors as the checkpoint: element counts match the loaded tiny-v3.
    void device_tensors_match_loaded_weights() {
        auto model = load_model(kFixtures + "/tiny-v3");
        const Weights& w = model->weights();
        ModelPresence p;
        p.lm_head = !w.lm_head.empty();
        p.mtp_embed = !w.mtp[0].embed_tokens.empty();
        p.mtp_head = !w.mtp[0].shared_head_head.empty();
        QVERIFY(p.mtp_embed && p.mtp_head);  // the fixture stores the copies, as V3 does
        Weights copy = allocate_weights(model->config());
        int64_t host = 0;
        for (const NamedTensor& t : tensor_table(const_cast<Weights&>(w), model->config()))
            if (!t.tensor->empty() && t.name.find("e_score_correction_bias") == std::string::npos) host += t.tensor->numel();
        QCOMPARE(elements(device_tensors(model->config(), p)), host);
        // One row per expert matrix pair: gate and up are stacked into [2I, D].
        int gate_up = 0;
        for (const auto& t : device_tensors(model->config(), p))
            if (t.role == Role::ExpGateUp) {
                ++gate_up;
                QCOMPARE(t.rows, 2 * int64_t(model->config().moe_intermediate_size));
            }
        QCOMPARE(gate_up, (model->config().num_moe_layers() + 1) * model->config().n_routed_experts);
    }

    // BF16 halves the big matrices; norms and the router stay f32. V3 in BF16 is ~1.37 TB.
    void weight_bytes_by_dtype() {
        ModelConfig c = load_cfg("deepseek-v3");
        ModelPresence p;
        p.mtp_embed = p.mtp_head = true;
        ModelCard card = model_card(c);
        const double params = double(card.total_params + card.mtp_params);
        MemoryPlan b = plan_memory(c, p, WeightDtype::BF16, 4096), f = plan_memory(c, p, WeightDtype::F32, 4096);
        QVERIFY(double(b.weights) > 2.0 * params);
        QVERIFY(double(b.weights) < 2.0 * params * 1.001);
        QVERIFY(double(f.weights) >= 4.0 * (params - double(bias_elements(c))));
        QVERIFY(double(f.weights) < 4.0 * params * 1.001);
    }

    // The cache arena: (d_c + d_rope) f32 per position and layer, the main stack plus one layer
    // per MTP module; the activation arena does not grow with the context past its caps.
    void cache_and_activation_bytes_data() {
        QTest::addColumn<QString>("config");
        QTest::addColumn<int>("capacity");
        QTest::newRow("v3 4096") << "deepseek-v3" << 4096;
        QTest::newRow("v3 1") << "deepseek-v3" << 1;
        QTest::newRow("v2-lite 163840") << "deepseek-v2-lite" << 163840;
        QTest::newRow("tiny 63") << "tiny-v3" << 63;
    }
    void cache_and_activation_bytes() {
        QFETCH(QString, config);
        QFETCH(int, capacity);
        ModelConfig c = load_cfg(config);
        MemoryPlan m = plan_memory(c, ModelPresence{}, WeightDtype::BF16, capacity);
        const int layers = c.num_hidden_layers + c.num_nextn_predict_layers;
        const int64_t exact = int64_t(layers) * capacity * (c.kv_lora_rank + c.qk_rope_head_dim) * 4;
        QVERIFY(m.cache >= exact);
        QVERIFY(m.cache <= exact + int64_t(layers) * 2 * kAlign);
        QCOMPARE(m.cache_per_position, int64_t(layers) * (c.kv_lora_rank + c.qk_rope_head_dim) * 4);
        MemoryPlan big = plan_memory(c, ModelPresence{}, WeightDtype::BF16, std::max(capacity, 1) * 8 + 4096);
        QVERIFY(big.activations >= m.activations);
        if (capacity >= 2048) QCOMPARE(big.activations, m.activations);
        QVERIFY(m.dims.chunk >= 1 && m.dims.chunk <= 256 && m.dims.chunk <= capacity);
        QVERIFY(m.dims.naive_positions <= 2048);
    }

    // A model that does not fit is refused with the sizes named, before anything is allocated.
    void refusal_data() {
        QTest::addColumn<QString>("config");
        QTest::addColumn<int>("dtype");  // 0 bf16, 1 f32
        QTest::addColumn<int>("capacity");
        QTest::addColumn<double>("free_gib");
        QTest::addColumn<bool>("fits");
        QTest::newRow("v3 bf16 on one H200") << "deepseek-v3" << 0 << 4096 << 139.0 << false;
        QTest::newRow("v2-lite bf16 on one H200") << "deepseek-v2-lite" << 0 << 4096 << 139.0 << true;
        QTest::newRow("v2-lite bf16 on 24 GiB") << "deepseek-v2-lite" << 0 << 4096 << 24.0 << false;
        QTest::newRow("v2-lite f32 on 80 GiB") << "deepseek-v2-lite" << 1 << 4096 << 80.0 << true;
        QTest::newRow("v2-lite f32 on 40 GiB") << "deepseek-v2-lite" << 1 << 4096 << 40.0 << false;
        QTest::newRow("tiny f32 on 1 GiB") << "tiny-v3" << 1 << 256 << 1.0 << true;
        QTest::newRow("tiny f32 on 100 MiB") << "tiny-v3" << 1 << 256 << 0.1 << false;
    }
    void refusal() {
        QFETCH(QString, config);
        QFETCH(int, dtype);
        QFETCH(int, capacity);
        QFETCH(double, free_gib);
        QFETCH(bool, fits);
        ModelConfig c = load_cfg(config);
        const WeightDtype d = dtype ? WeightDtype::F32 : WeightDtype::BF16;
        MemoryPlan m = plan_memory(c, ModelPresence{}, d, capacity);
        const int64_t free_b = int64_t(free_gib * double(1ll << 30));
        QCOMPARE(m.total() <= free_b, fits);
        try {
            check_fits(m, free_b, free_b + (1ll << 30), "NVIDIA Test", d, capacity);
            QVERIFY(fits);
        } catch (const DeviceError& e) {
            QVERIFY2(!fits, e.what());
            const std::string msg = e.what();
            QVERIFY2(msg.find("does not fit on NVIDIA Test") != std::string::npos, e.what());
            QVERIFY2(msg.find("weights") != std::string::npos && msg.find(weight_dtype_name(d)) != std::string::npos,
                     e.what());
            QVERIFY2(msg.find(std::to_string(capacity) + " positions") != std::string::npos, e.what());
            QVERIFY2(msg.find(gib(m.total())) != std::string::npos, e.what());
        }
    }

    // Without a device, "auto" stays on the CPU and says why; "cuda" throws DeviceError.
    void selection_without_device() {
        CudaProbe p = probe_cuda();
        if (p.device_count > 0) QSKIP("a CUDA device is present: selection is checked by moescope-gpu-checks");
        auto model = load_model(kFixtures + "/tiny-v3");
        BackendSelection s = select_backend("auto", model, 64);
        QVERIFY(s.backend);
        QCOMPARE(QString::fromStdString(s.backend->name()), QString("cpu"));
        QVERIFY2(s.notice.find("running on the CPU: ") == 0, s.notice.c_str());
        QVERIFY2(s.notice.find(p.error) != std::string::npos, s.notice.c_str());
        if (p.library_found) {
            // The library loaded and asked the runtime: the driver's answer reaches the notice.
            QVERIFY2(s.notice.find("cudaGetDeviceCount") != std::string::npos, s.notice.c_str());
        }
        bool threw = false;
        try {
            select_backend("cuda", model, 64);
        } catch (const DeviceError& e) {
            threw = true;
            QVERIFY2(std::string(e.what()).find("the CUDA backend cannot run: ") == 0, e.what());
        }
        QVERIFY(threw);
        // The fallback computes the reference numbers.
        ForwardResult a, b;
        auto cache = s.backend->new_cache(0, 8);
        const int toks[3] = {5, 7, 11};
        s.backend->forward(toks, 3, *cache, ForwardOptions{}, a);
        KvCache kc = model->new_cache();
        model->forward(toks, 3, kc, ForwardOptions{}, b);
        QCOMPARE(a.logits, b.logits);
    }

    // The library's extern "C" entry points, called directly: a probe error, a null backend.
    void library_entry_points() {
        const std::string path = cuda_library_path();
        if (!std::filesystem::exists(path)) QSKIP("this build has no CUDA backend library");
        void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
        QVERIFY2(h, dlerror());
        using ProbeFn = int (*)(char*, size_t, char*, size_t);
        using CreateFn = Backend* (*)(std::shared_ptr<Model>*, int, char*, size_t);
        auto probe = reinterpret_cast<ProbeFn>(dlsym(h, "moescope_cuda_probe"));
        auto create = reinterpret_cast<CreateFn>(dlsym(h, "moescope_cuda_create_backend"));
        QVERIFY(probe && create && dlsym(h, "moescope_cuda_bench"));
        char name[128] = {0}, err[512] = {0};
        const int n = probe(name, sizeof name, err, sizeof err);
        if (n > 0) QSKIP("a CUDA device is present");
        QCOMPARE(n, 0);
        QVERIFY2(std::string(err).find("cudaGetDeviceCount: ") == 0, err);
        auto model = load_model(kFixtures + "/tiny-v3");
        char cerr[1024] = {0};
        Backend* b = create(&model, 64, cerr, sizeof cerr);
        QVERIFY(b == nullptr);
        QVERIFY2(std::string(cerr).find("no CUDA device") != std::string::npos, cerr);
        // Errors are truncated to the caller's buffer, never overrun it.
        char tiny[8];
        std::memset(tiny, 'x', sizeof tiny);
        probe(nullptr, 0, tiny, 4);
        QCOMPARE(tiny[3], '\0');
        QCOMPARE(tiny[4], 'x');
    }

    // Light when unused: the CLI and the engine do not link the CUDA runtime or cuBLAS.
    void cli_links_no_cuda() {
        const QString cli = QString(MOESCOPE_BINARY_DIR) + "/engine/moescope-cli";
        if (!QFileInfo::exists(cli)) QSKIP("moescope-cli is not built");
        QProcess ldd;
        ldd.start("ldd", {cli});
        QVERIFY(ldd.waitForFinished(10000));
        const QString out = QString::fromUtf8(ldd.readAllStandardOutput());
        QVERIFY2(out.contains("libc.so"), qPrintable(out));
        QVERIFY2(!out.contains("libcudart") && !out.contains("libcublas") && !out.contains("libcuda.so"),
                 qPrintable(out));
        const QString lib = QString::fromStdString(cuda_library_path());
        if (QFileInfo::exists(lib)) {
            ldd.start("ldd", {lib});
            QVERIFY(ldd.waitForFinished(10000));
            const QString l = QString::fromUtf8(ldd.readAllStandardOutput());
            QVERIFY2(l.contains("libcudart"), qPrintable(l));
            QVERIFY2(!l.contains("libcuda.so"), qPrintable(l));  // never the driver library
        }
    }
};

QTEST_GUILESS_MAIN(TestCudaHost)
#include "test_cuda_host.moc"
