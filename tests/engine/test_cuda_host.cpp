// Host-side logic of the CUDA backend, tested without a GPU: the device memory plan (the
// tensors it uploads against the model card and the loaded checkpoint, arena sizes, FP8
// residency's 1 byte per parameter plus block scales), the FP8 block grid and the exact
// re-quantization of a loaded FP8 checkpoint, the refusal of a model that does not fit, and
// backend selection falling back to the CPU.
#include <QProcess>
#include <QtTest>

#include <dlfcn.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>

#include "engine/backend.h"
#include "engine/config.h"
#include "engine/errors.h"
#include "engine/loader.h"
#include "engine/model/model.h"
#include "engine/weights.h"
#include "kernels/fp8.h"
#include "kernels/memory_plan.h"

#include <random>

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

// A random matrix that went through FP8: our own 128x128 scales, values e4m3 * scale, and the
// scales as a checkpoint stores them ([ceil(rows/128), ceil(cols/128)], no padding).
struct Fp8Matrix {
    int64_t rows, cols;
    std::vector<float> values, scale_inv;
};
Fp8Matrix fp8_matrix(int64_t rows, int64_t cols, uint32_t seed) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> u(-1, 1);
    Fp8Matrix m{rows, cols, std::vector<float>(size_t(rows * cols)), {}};
    for (int64_t i = 0; i < rows * cols; ++i)  // blocks of very different magnitudes
        m.values[size_t(i)] = u(rng) * std::ldexp(1.0f, int((i / cols) / 128 * 3 + (i % cols) / 128) % 9 - 4);
    const Fp8Grid g{rows, cols, 0};
    std::vector<uint8_t> q(size_t(rows * cols));
    std::vector<float> grid(size_t(g.scale_count()));
    quantize_fp8_amax(q.data(), grid.data(), g.ld(), 0, m.values.data(), rows, cols);
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) m.values[size_t(r * cols + c)] = fp8_value(q.data(), grid.data(), g, r, c);
    for (int64_t br = 0; br < g.row_blocks(); ++br)
        for (int64_t bc = 0; bc < g.col_blocks(); ++bc) m.scale_inv.push_back(grid[size_t(br * g.ld() + bc)]);
    return m;
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

    // Which layers are MoE on the device is what the checkpoint and the CPU model say, also
    // for an MTP module past a moe_layer_freq / first_k_dense_replace pattern (tensor_table: an
    // MTP layer is MoE whenever the model has routed experts). A dense MTP spec there made the
    // upload throw ShapeError (its gate_proj is empty) and read a router bias the model lacks.
    void device_layers_follow_tensor_table_data() {
        QTest::addColumn<int>("layers");
        QTest::addColumn<int>("freq");
        QTest::addColumn<int>("first_dense");
        QTest::newRow("tiny-v3 as is") << 4 << 1 << 1;
        QTest::newRow("moe_layer_freq 2, MTP at an odd index") << 3 << 2 << 0;
        QTest::newRow("moe_layer_freq 2, MTP at an even index") << 4 << 2 << 1;
        QTest::newRow("every main layer dense") << 2 << 1 << 5;
    }
    void device_layers_follow_tensor_table() {
        QFETCH(int, layers);
        QFETCH(int, freq);
        QFETCH(int, first_dense);
        nlohmann::json j = nlohmann::json::parse(std::ifstream(kFixtures + "/tiny-v3/config.json"));
        j["num_hidden_layers"] = layers;
        j["moe_layer_freq"] = freq;
        j["first_k_dense_replace"] = first_dense;
        const ModelConfig c = ModelConfig::from_json(j, "tiny-v3 variant");
        Weights w = allocate_weights(c);
        int64_t host = 0;
        for (const NamedTensor& t : tensor_table(w, c))
            if (!t.tensor->empty() && t.name.find("e_score_correction_bias") == std::string::npos)
                host += t.tensor->numel();
        ModelPresence p;
        p.lm_head = !c.tie_word_embeddings;  // allocate_weights leaves the optional MTP copies empty
        const std::vector<TensorSpec> specs = device_tensors(c, p);
        QCOMPARE(elements(specs), host);
        const Model model(c, w);
        for (int l = 0; l < c.num_hidden_layers + c.num_nextn_predict_layers; ++l) {
            const bool host_moe = l < c.num_hidden_layers ? w.layers[size_t(l)].is_moe
                                                          : w.mtp[size_t(l - c.num_hidden_layers)].layer.is_moe;
            QCOMPARE(stack_layer_is_moe(c, l), host_moe);
            QCOMPARE(!model.bias(l).empty(), host_moe);  // build_weights uploads this bias
            const bool router = std::any_of(specs.begin(), specs.end(), [&](const TensorSpec& t) {
                return t.role == Role::Router && t.layer == l;
            });
            QCOMPARE(router, host_moe);
        }
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

    // FP8 residency: every quantizable linear weight is 1 byte per parameter plus its 128x128
    // block scales (f32, leading dimension padded to 4); everything else as in BF16. V3 then
    // needs about half the BF16 bytes.
    void fp8_weight_bytes_data() {
        QTest::addColumn<QString>("config");
        QTest::newRow("deepseek-v3") << "deepseek-v3";
        QTest::newRow("deepseek-v2-lite") << "deepseek-v2-lite";
        QTest::newRow("tiny-v3") << "tiny-v3";
    }
    void fp8_weight_bytes() {
        QFETCH(QString, config);
        ModelConfig c = load_cfg(config);
        ModelPresence p;
        p.mtp_embed = p.mtp_head = true;
        int64_t fp8_params = 0, scale_bound = 0, other_bf16 = 0, n = 0;
        for (const TensorSpec& t : device_tensors(c, p)) {
            ++n;
            if (t.fp8) {
                fp8_params += t.rows * t.cols;
                // each part's blocks, padded: at most (rows/128 + 2) x (cols/128 + 4) scales
                scale_bound += (t.rows / 128 + 2) * (t.cols / 128 + 4) * 4;
                QCOMPARE(t.bytes(WeightDtype::FP8), t.grid().scale_offset() + t.grid().scale_count() * 4);
            } else {
                QCOMPARE(t.bytes(WeightDtype::FP8), t.bytes(WeightDtype::BF16));
                other_bf16 += t.bytes(WeightDtype::BF16);
            }
            // Embeddings and heads stay BF16 (DeepSeek's FP8 release keeps them so), the router f32;
            // every linear weight the release quantizes is FP8, kv_b included.
            if (t.role == Role::Embed || t.role == Role::Head || t.role == Role::Router) QVERIFY(!t.fp8);
            if (t.role == Role::KVB || t.role == Role::KVA || t.role == Role::OProj || t.role == Role::ExpDown)
                QVERIFY(t.fp8);
            if (t.role == Role::ExpGateUp || t.role == Role::MlpGateUp || t.role == Role::SharedGateUp)
                QCOMPARE(t.split * 2, t.rows);
        }
        MemoryPlan f = plan_memory(c, p, WeightDtype::FP8, 4096), b = plan_memory(c, p, WeightDtype::BF16, 4096);
        const int64_t tables = b.weights - [&] {
            int64_t w = 0;
            for (const TensorSpec& t : device_tensors(c, p)) w += align_up(t.bytes(WeightDtype::BF16));
            return w;
        }();  // expert pointer tables, router biases, rope frequencies: the same in both plans
        QVERIFY(f.weights >= fp8_params + other_bf16 + tables);
        QVERIFY(f.weights <= fp8_params + other_bf16 + tables + scale_bound + n * 2 * kAlign);
        if (config == "deepseek-v3") {
            QVERIFY2(double(f.weights) < 0.52 * double(b.weights), qPrintable(QString::fromStdString(gib(f.weights))));
            // the prefill scratch: the widest input is the dense down_proj (18432), the most
            // output rows the dense gate|up (2 x 18432), chunks of 256 rows
            const Fp8ScratchSizes z = fp8_scratch_sizes(c, f.dims, WeightDtype::FP8);
            QCOMPARE(z.max_k, 18432);
            QCOMPARE(z.max_out, 2 * 18432);
            QCOMPARE(z.rows_pad, 256);
            QCOMPARE(f.activations - b.activations, z.bytes);
        }
        QCOMPARE(fp8_scratch_sizes(c, b.dims, WeightDtype::BF16).bytes, int64_t(0));
    }

    // The block grid: scale rows per part of a stacked gate|up, leading dimension padded to 4,
    // scales 256-byte aligned after the values.
    void fp8_grid() {
        const Fp8Grid a{300, 200, 0};
        QCOMPARE(a.row_blocks(), int64_t(3));
        QCOMPARE(a.col_blocks(), int64_t(2));
        QCOMPARE(a.ld(), int64_t(4));
        QCOMPARE(a.scale_row(127), int64_t(0));
        QCOMPARE(a.scale_row(128), int64_t(1));
        QCOMPARE(a.scale_row(299), int64_t(2));
        QCOMPARE(a.scale_offset(), int64_t(60160));  // 60000 rounded up to 256
        QCOMPARE(a.bytes(), int64_t(60160 + 3 * 4 * 4));
        // gate|up of V2-Lite experts: 1408 = 11 blocks each; of tiny-v3: 16 rows each
        const Fp8Grid v2{2816, 2048, 1408}, tiny{32, 64, 16};
        QCOMPARE(v2.row_blocks(), int64_t(22));
        QCOMPARE(v2.scale_row(1407), int64_t(10));
        QCOMPARE(v2.scale_row(1408), int64_t(11));
        QCOMPARE(tiny.row_blocks(), int64_t(2));
        QCOMPARE(tiny.scale_row(15), int64_t(0));
        QCOMPARE(tiny.scale_row(16), int64_t(1));  // up starts its own block
        QCOMPARE(tiny.scale_row(31), int64_t(1));
        const Fp8Grid odd{2 * 200, 64, 200};      // a split inside a block
        QCOMPARE(odd.row_blocks(), int64_t(4));
        QCOMPARE(odd.scale_row(199), int64_t(1));
        QCOMPARE(odd.scale_row(200), int64_t(2));
        QCOMPARE(odd.scale_row(328), int64_t(3));
        QCOMPARE(Fp8Grid({1408, 1408, 0}).ld(), int64_t(12));  // 11 blocks padded to 12
        QCOMPARE(Fp8Grid({7168, 7168, 0}).ld(), int64_t(56));
    }

    // e4m3: every finite code survives decode -> encode; halfway values round to even.
    void fp8_codec_round_trip() {
        for (int b = 0; b < 256; ++b) {
            if ((b & 0x7f) == 0x7f) continue;  // NaN
            QCOMPARE(int(f32_to_fp8_e4m3(fp8_e4m3_to_f32(uint8_t(b)))), b);
        }
        QCOMPARE(fp8_e4m3_to_f32(f32_to_fp8_e4m3(1.0625f)), 1.0f);   // tie between 1 and 1.125 -> even
        QCOMPARE(fp8_e4m3_to_f32(f32_to_fp8_e4m3(1.1875f)), 1.25f);  // tie between 1.125 and 1.25 -> even
        QCOMPARE(fp8_e4m3_to_f32(f32_to_fp8_e4m3(1000.0f)), 448.0f); // saturates
    }

    // Values that came from FP8 re-quantize to the same bytes with their scales (so the device
    // gets the checkpoint's bytes, not a second rounding); any change to a value is detected.
    void fp8_requantize_exact_data() {
        QTest::addColumn<int>("rows");
        QTest::addColumn<int>("cols");
        QTest::newRow("1 x 1") << 1 << 1;
        QTest::newRow("3 x 63") << 3 << 63;
        QTest::newRow("130 x 257") << 130 << 257;
        QTest::newRow("384 x 512") << 384 << 512;
    }
    void fp8_requantize_exact() {
        QFETCH(int, rows);
        QFETCH(int, cols);
        Fp8Matrix m = fp8_matrix(rows, cols, uint32_t(rows * 1000 + cols));
        const Fp8Grid g{rows, cols, 0};
        std::vector<uint8_t> q(size_t(rows) * cols), q2 = q;
        std::vector<float> grid(size_t(g.scale_count()), -1.0f), grid2 = grid;
        QVERIFY(requantize_fp8_exact(q.data(), grid.data(), g.ld(), 0, m.values.data(), rows, cols, m.scale_inv.data()));
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t c = 0; c < cols; ++c)
                QCOMPARE(fp8_value(q.data(), grid.data(), g, r, c), m.values[size_t(r * cols + c)]);
        for (int64_t br = 0; br < g.row_blocks(); ++br)
            for (int64_t bc = g.col_blocks(); bc < g.ld(); ++bc) QCOMPARE(grid[size_t(br * g.ld() + bc)], 0.0f);
        // Our own amax scales of these values give the same bytes (the scales may differ in the
        // last bit: 448 * s rounded, divided by 448).
        quantize_fp8_amax(q2.data(), grid2.data(), g.ld(), 0, m.values.data(), rows, cols);
        QVERIFY(q2 == q);
        // One value nudged by one ulp no longer has an exact FP8 form.
        std::vector<float> changed = m.values;
        float& v = changed[changed.size() / 2];
        v = std::nextafter(v, 2.0f * v + 1.0f);
        QVERIFY(!requantize_fp8_exact(q.data(), grid.data(), g.ld(), 0, changed.data(), rows, cols,
                                      m.scale_inv.data()));
    }

    // A stacked gate|up on the device keeps each part's grid: both parts re-quantize exactly
    // into one grid and read back as the checkpoint's values.
    void fp8_requantize_stacked() {
        const int I = 200, D = 300;
        Fp8Matrix gate = fp8_matrix(I, D, 7), up = fp8_matrix(I, D, 8);
        const Fp8Grid g{2 * I, D, I};
        std::vector<uint8_t> q(size_t(2 * I * D));
        std::vector<float> grid(size_t(g.scale_count()));
        QVERIFY(requantize_fp8_exact(q.data(), grid.data(), g.ld(), 0, gate.values.data(), I, D, gate.scale_inv.data()));
        QVERIFY(requantize_fp8_exact(q.data() + I * D, grid.data(), g.ld(), fp8_cdiv(I, kFp8Block), up.values.data(), I,
                                     D, up.scale_inv.data()));
        for (int64_t r = 0; r < 2 * I; ++r)
            for (int64_t c = 0; c < D; c += 7)
                QCOMPARE(fp8_value(q.data(), grid.data(), g, r, c),
                         r < I ? gate.values[size_t(r * D + c)] : up.values[size_t((r - I) * D + c)]);
    }

    // An FP8 checkpoint written by save_checkpoint and loaded again keeps its scale_inv beside
    // the dequantized values, and every quantizable tensor re-quantizes exactly with it.
    void fp8_checkpoint_keeps_scales() {
        auto base = load_model(kFixtures + "/tiny-v3");
        const std::filesystem::path dir =
            std::filesystem::temp_directory_path() / ("moescope-test-fp8-" + std::to_string(::getpid()));
        std::filesystem::remove_all(dir);
        Weights w = base->weights();
        save_checkpoint(dir, base->config(), w, SaveFormat::FP8);
        auto model = load_model(dir);
        int quantizable = 0;
        for (const NamedTensor& t : tensor_table(const_cast<Weights&>(model->weights()), model->config())) {
            if (t.tensor->empty()) continue;
            if (!t.quantizable) {
                QVERIFY2(t.tensor->block_scale.empty(), t.name.c_str());
                continue;
            }
            ++quantizable;
            const int64_t rows = t.shape[0], cols = t.shape[1];
            QCOMPARE(int64_t(t.tensor->block_scale.size()), fp8_cdiv(rows, 128) * fp8_cdiv(cols, 128));
            const Fp8Grid g{rows, cols, 0};
            std::vector<uint8_t> q(size_t(rows * cols));
            std::vector<float> grid(size_t(g.scale_count()));
            QVERIFY2(requantize_fp8_exact(q.data(), grid.data(), g.ld(), 0, t.tensor->ptr(), rows, cols,
                                          t.tensor->block_scale.data()),
                     t.name.c_str());
        }
        QVERIFY(quantizable > 100);
        // A BF16 checkpoint has no scales.
        auto bf = load_model(kFixtures + "/tiny-v3");
        QVERIFY(bf->weights().layers[0].attn.kv_a_proj_with_mqa.block_scale.empty());
        std::filesystem::remove_all(dir);
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

    // The telemetry block: every section 256-byte aligned, in order, large enough for what the
    // kernels write into it, and the allocated block (telemetry_bytes) holds the layout of any
    // chunk of the main stack or an MTP module, scores included. The old size, 2 * layers *
    // align_up(per-layer bytes), was below the six aligned sections of a model with few layers
    // (1536 bytes against 512 for one MoE layer at capacity 1): the router wrote past the block
    // into the cuBLAS workspace and the copy overran its pinned host buffer.
    void telemetry_layout_fits_data() {
        QTest::addColumn<QString>("config");
        QTest::addColumn<int>("layers");  // 0: as configured
        QTest::addColumn<int>("capacity");
        for (int cap : {1, 3, 63, 4096}) {
            const QByteArray c = QByteArray::number(cap);
            QTest::newRow("tiny-v3 " + c) << "tiny-v3" << 0 << cap;
            QTest::newRow("tiny-v3 one MoE layer, no MTP " + c) << "tiny-v3" << 1 << cap;
            QTest::newRow("deepseek-v3 " + c) << "deepseek-v3" << 0 << cap;
            QTest::newRow("deepseek-v2-lite " + c) << "deepseek-v2-lite" << 0 << cap;
        }
    }
    void telemetry_layout_fits() {
        QFETCH(QString, config);
        QFETCH(int, layers);
        QFETCH(int, capacity);
        ModelConfig c = load_cfg(config);
        if (layers > 0) {
            nlohmann::json j = c.to_json();
            j["num_hidden_layers"] = layers;
            j["first_k_dense_replace"] = 0;
            j["num_nextn_predict_layers"] = 0;
            c = ModelConfig::from_json(j, "one-layer variant");
        }
        const MemoryPlan m = plan_memory(c, ModelPresence{}, WeightDtype::BF16, capacity);
        const int64_t block = telemetry_bytes(c, m.dims);
        const int L = c.num_hidden_layers;
        int main_moe = 0;
        for (int l = 0; l < L; ++l) main_moe += stack_layer_is_moe(c, l);
        // What moe_forward / layer_forward write per chunk of n rows (G and k as the router uses them).
        const int64_t k = c.num_experts_per_tok, E = c.n_routed_experts,
                      G = c.topk_method == "greedy" ? 1 : c.n_group;
        struct Stack {
            int moe, layers;
        };
        std::vector<Stack> stacks{{main_moe, L}};
        if (c.num_nextn_predict_layers > 0) stacks.push_back({stack_layer_is_moe(c, L) ? 1 : 0, 1});
        for (const Stack& st : stacks)
            for (int n : {1, std::min(3, m.dims.chunk), m.dims.chunk})
                for (bool scores : {false, true}) {
                    const TeleLayout t = telemetry_layout(c, n, st.moe, st.layers, scores);
                    const std::string what = "n " + std::to_string(n) + " moe " + std::to_string(st.moe) +
                                             " layers " + std::to_string(st.layers) + (scores ? " scores" : "");
                    QVERIFY2(t.end <= block, (what + ": end " + std::to_string(t.end) + " > block " +
                                              std::to_string(block)).c_str());
                    std::vector<std::pair<int64_t, int64_t>> sec{{t.ids, st.moe * n * k * 4},
                                                                 {t.weights, st.moe * n * k * 4},
                                                                 {t.kept, st.moe * n * G},
                                                                 {t.counts, st.moe * E * 4},
                                                                 {t.norms, int64_t(st.layers) * n * 4}};
                    if (scores) sec.push_back({t.scores, st.moe * n * E * 4});
                    else QCOMPARE(t.scores, int64_t(-1));
                    for (size_t i = 0; i < sec.size(); ++i) {
                        QVERIFY2(sec[i].first % kAlign == 0, what.c_str());
                        const int64_t next = i + 1 < sec.size() ? sec[i + 1].first : t.end;
                        QVERIFY2(sec[i].first + sec[i].second <= next, (what + " section " + std::to_string(i)).c_str());
                    }
                }
        // The plan counts the block the backend carves.
        QVERIFY(m.activations >= activation_bytes(c, m.dims) + block + kCublasWorkspace);
    }

    // A model that does not fit is refused with the sizes named, before anything is allocated.
    // The grouped expert GEMM's tile map holds grouped_max_tiles(R, E) entries: every routing of
    // R rows over E experts must fit (sum of ceil(count / 64)), including the extremes (all rows
    // on one expert, one row on each of min(R, E) experts, chunk-sized layers of V3 and V2-Lite).
    void grouped_tile_bound() {
        std::mt19937 rng(5);
        auto needed = [](const std::vector<int>& counts) {
            int t = 0;
            for (int c : counts) t += (c + kGroupedRows - 1) / kGroupedRows;
            return t;
        };
        for (auto [R, E] : {std::pair{2048, 256}, {1536, 64}, {65, 16}, {100, 1100}, {64 * 40 + 1, 40}, {1, 1}}) {
            std::vector<int> one(size_t(E), 0);
            one[0] = R;
            QVERIFY(needed(one) <= grouped_max_tiles(R, E));
            std::vector<int> spread(size_t(E), 0);
            for (int r = 0; r < R; ++r) ++spread[size_t(r % E)];
            QVERIFY2(needed(spread) <= grouped_max_tiles(R, E), qPrintable(QString("R %1 E %2").arg(R).arg(E)));
            for (int trial = 0; trial < 200; ++trial) {
                std::vector<int> c(size_t(E), 0);
                const int hot = 1 + int(rng() % uint32_t(E));  // rows on the first `hot` experts only
                for (int r = 0; r < R; ++r) ++c[size_t(rng() % uint32_t(hot))];
                QVERIFY(needed(c) <= grouped_max_tiles(R, E));
            }
        }
    }

    void refusal_data() {
        QTest::addColumn<QString>("config");
        QTest::addColumn<int>("dtype");  // 0 bf16, 1 f32, 2 fp8
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
        QTest::newRow("v3 fp8 on one H200") << "deepseek-v3" << 2 << 4096 << 139.0 << false;
        QTest::newRow("v3 fp8 on 8 H200s' worth") << "deepseek-v3" << 2 << 4096 << 8 * 139.0 << true;
        QTest::newRow("v2-lite fp8 on 24 GiB") << "deepseek-v2-lite" << 2 << 4096 << 24.0 << true;
    }
    void refusal() {
        QFETCH(QString, config);
        QFETCH(int, dtype);
        QFETCH(int, capacity);
        QFETCH(double, free_gib);
        QFETCH(bool, fits);
        ModelConfig c = load_cfg(config);
        const WeightDtype d = dtype == 2 ? WeightDtype::FP8 : dtype ? WeightDtype::F32 : WeightDtype::BF16;
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
