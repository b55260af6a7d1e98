// Telemetry records <-> JSON, the JSONL writer and reader, and the exports.
#include "engine/telemetry.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <sstream>
#include <type_traits>

#include "engine/errors.h"
#include "engine/safetensors.h"

namespace moescope {

using nlohmann::json;

namespace {

template <class... Ts>
struct overloaded : Ts... {
    using Ts::operator()...;
};
template <class... Ts>
overloaded(Ts...) -> overloaded<Ts...>;

// [rows * cols] -> [[cols] * rows]
template <class T>
json nested(const std::vector<T>& v, size_t cols) {
    json out = json::array();
    if (cols == 0) return out;
    for (size_t r = 0; r * cols < v.size(); ++r)
        out.push_back(std::vector<T>(v.begin() + long(r * cols), v.begin() + long((r + 1) * cols)));
    return out;
}

// A JSON value as T. Integers are range-checked: nlohmann's get<int>() casts a number like
// 6.7e117 straight to int, which is undefined behaviour (found by fuzzing read_trace).
template <class T>
T value_as(const json& x) {
    if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
        constexpr double lo = double(std::numeric_limits<T>::min()), hi = double(std::numeric_limits<T>::max());
        bool ok = false;
        T v{};
        if (x.is_number_unsigned()) {
            const uint64_t u = x.get<uint64_t>();
            ok = u <= uint64_t(std::numeric_limits<T>::max());
            v = T(ok ? u : 0);
        } else if (x.is_number_integer()) {
            const int64_t i = x.get<int64_t>();
            ok = i >= int64_t(std::numeric_limits<T>::min()) && uint64_t(std::max<int64_t>(i, 0)) <= uint64_t(std::numeric_limits<T>::max());
            v = T(ok ? i : 0);
        } else if (x.is_number_float()) {
            const double d = x.get<double>();
            // hi is exact for 32-bit T; for 64-bit it rounds up to 2^63, itself out of range.
            ok = d >= lo && (sizeof(T) < 8 ? d <= hi : d < hi) && d == std::trunc(d);  // NaN fails
            v = T(ok ? d : 0);
        } else {
            throw FormatError(std::string("expected an integer, found ") + x.type_name());
        }
        if (!ok) throw FormatError("number " + x.dump() + " is not an integer of the expected range");
        return v;
    } else {
        return x.get<T>();
    }
}

template <class T>
std::vector<T> flat(const json& j, size_t& cols) {
    std::vector<T> out;
    cols = 0;
    for (const auto& row : j) {
        cols = row.size();
        for (const auto& x : row) out.push_back(value_as<T>(x));
    }
    return out;
}

}  // namespace

const char* record_type(const Record& r) {
    static const char* names[] = {"meta", "token", "route", "load", "bias",     "latent",
                                  "mtp",  "timing", "train", "eval", "ablation", "evaluation"};
    return names[r.index()];
}

json to_json(const Record& rec) {
    return std::visit(
        overloaded{
            [](const MetaRecord& r) {
                return json{{"type", "meta"}, {"card", r.card}, {"config", r.config}, {"settings", r.settings}};
            },
            [](const TokenRecord& r) {
                return json{{"type", "token"},  {"step", r.step},       {"position", r.position},
                            {"id", r.id},       {"text", r.text},       {"prompt", r.prompt},
                            {"drafted", r.drafted}, {"surprisal", r.surprisal}};
            },
            [](const RouteRecord& r) {
                json j{{"type", "route"},   {"step", r.step}, {"position", r.position}, {"token", r.token},
                       {"k", r.k},          {"layers", r.layers}, {"ids", nested(r.ids, size_t(r.k))},
                       {"weights", nested(r.weights, size_t(r.k))}};
                if (!r.kept_groups.empty()) {
                    std::vector<int> kg(r.kept_groups.begin(), r.kept_groups.end());
                    j["kept_groups"] = nested(kg, size_t(r.n_group));
                }
                if (!r.scores.empty()) j["scores"] = nested(r.scores, size_t(r.E));
                if (!r.bias.empty()) j["bias"] = nested(r.bias, size_t(r.E));
                return j;
            },
            [](const LoadRecord& r) {
                return json{{"type", "load"}, {"step", r.step}, {"layer", r.layer}, {"counts", r.counts},
                            {"maxvio", max_violation(r.counts)}};
            },
            [](const BiasRecord& r) {
                return json{{"type", "bias"}, {"step", r.step}, {"layer", r.layer}, {"bias", r.bias}};
            },
            [](const LatentRecord& r) {
                json j{{"type", "latent"}, {"step", r.step}, {"position", r.position}, {"norms", r.norms},
                       {"cache_bytes", r.cache_bytes}, {"mha_bytes", r.mha_bytes}};
                if (r.layer >= 0) {
                    j["layer"] = r.layer;
                    j["c"] = r.c;
                    j["k_pe"] = r.k_pe;
                }
                return j;
            },
            [](const MtpRecord& r) {
                return json{{"type", "mtp"}, {"step", r.step}, {"position", r.position}, {"draft", r.draft},
                            {"accepted", r.accepted}, {"acceptance_rate", r.acceptance_rate}};
            },
            [](const TimingRecord& r) {
                return json{{"type", "timing"}, {"step", r.step}, {"phase", r.phase}, {"seconds", r.seconds},
                            {"tokens", r.tokens}, {"tokens_per_s", r.tokens_per_s}};
            },
            [](const TrainRecord& r) {
                return json{{"type", "train"},         {"step", r.step},     {"loss", r.loss},
                            {"mtp_loss", r.mtp_loss},  {"aux_loss", r.aux_loss}, {"lr", r.lr},
                            {"grad_norm", r.grad_norm}, {"tokens_per_s", r.tokens_per_s},
                            {"maxvio_batch", r.maxvio_batch}};
            },
            [](const EvalRecord& r) {
                return json{{"type", "eval"}, {"step", r.step}, {"val_loss", r.val_loss},
                            {"maxvio_global", r.maxvio_global}};
            },
            [](const AblationRecord& r) {
                return json{{"type", "ablation"}, {"step", r.step},         {"layer", r.layer},
                            {"disabled", r.disabled}, {"drop_top", r.drop_top}};
            },
            [](const EvaluationRecord& r) {
                auto run = [](const PerplexityRun& p) {
                    json j{{"windows", p.windows}, {"tokens", p.tokens}, {"cross_entropy", p.cross_entropy}};
                    if (p.mtp_tokens > 0) {
                        j["mtp_tokens"] = p.mtp_tokens;
                        j["mtp_cross_entropy"] = p.mtp_cross_entropy;
                    }
                    return j;
                };
                json j{{"type", "evaluation"}, {"step", r.step},       {"corpus", r.corpus},
                       {"context", r.context},  {"text_tokens", r.text_tokens}, {"baseline", run(r.baseline)}};
                if (r.ablated) {
                    j["ablation"] = r.ablation;
                    j["with_ablation"] = run(r.with_ablation);
                    json hurt = json::array();
                    for (const HurtToken& h : r.hurt)
                        hurt.push_back({{"token", h.token}, {"text", h.text}, {"count", h.count},
                                        {"baseline", h.baseline}, {"ablated", h.ablated}, {"added", h.added}});
                    j["hurt"] = hurt;
                }
                if (!r.sweep.empty()) {
                    json sw = json::array();
                    for (const PerplexityRun& p : r.sweep) sw.push_back(run(p));
                    j["sweep"] = sw;
                    if (!r.sweep_layers.empty()) j["sweep_layers"] = r.sweep_layers;
                    if (!r.sweep_experts.empty()) {
                        j["sweep_experts"] = r.sweep_experts;
                        j["sweep_expert_layer"] = r.sweep_expert_layer;
                    }
                }
                return j;
            },
        },
        rec);
}

Record record_from_json(const json& j) {
    if (!j.is_object() || !j.contains("type") || !j["type"].is_string())
        throw FormatError("record has no \"type\"");
    const std::string t = j["type"];
    auto get = [&](const char* k, auto fallback) {
        using T = decltype(fallback);
        return j.contains(k) && !j[k].is_null() ? value_as<T>(j[k]) : fallback;
    };
    try {
        if (t == "meta") return MetaRecord{get("card", json()), get("config", json()), get("settings", json())};
        if (t == "token") {
            TokenRecord r;
            r.step = get("step", int64_t(0));
            r.position = get("position", 0);
            r.id = get("id", 0);
            r.text = get("text", std::string());
            r.prompt = get("prompt", false);
            r.drafted = get("drafted", false);
            r.surprisal = get("surprisal", 0.0f);
            return r;
        }
        if (t == "route") {
            RouteRecord r;
            r.step = get("step", int64_t(0));
            r.position = get("position", 0);
            r.token = get("token", 0);
            r.k = get("k", 0);
            r.layers = get("layers", std::vector<int>());
            size_t cols = 0;
            r.ids = flat<int>(j.at("ids"), cols);
            r.weights = flat<float>(j.at("weights"), cols);
            if (j.contains("kept_groups")) {
                auto kg = flat<int>(j["kept_groups"], cols);
                r.kept_groups.assign(kg.begin(), kg.end());
                r.n_group = int(cols);
            }
            if (j.contains("scores")) {
                r.scores = flat<float>(j["scores"], cols);
                r.E = int(cols);
            }
            if (j.contains("bias")) r.bias = flat<float>(j["bias"], cols);
            if (r.ids.size() != r.layers.size() * size_t(r.k))
                throw FormatError("route record: ids do not match layers x k");
            return r;
        }
        if (t == "load") return LoadRecord{get("step", int64_t(0)), get("layer", 0), get("counts", std::vector<int64_t>())};
        if (t == "bias") return BiasRecord{get("step", int64_t(0)), get("layer", 0), get("bias", std::vector<float>())};
        if (t == "ablation")
            return AblationRecord{get("step", int64_t(0)), get("layer", 0), get("disabled", std::vector<int>()),
                                  get("drop_top", 0)};
        if (t == "latent") {
            LatentRecord r;
            r.step = get("step", int64_t(0));
            r.position = get("position", 0);
            r.norms = get("norms", std::vector<float>());
            r.layer = get("layer", -1);
            r.c = get("c", std::vector<float>());
            r.k_pe = get("k_pe", std::vector<float>());
            r.cache_bytes = get("cache_bytes", int64_t(0));
            r.mha_bytes = get("mha_bytes", int64_t(0));
            return r;
        }
        if (t == "mtp")
            return MtpRecord{get("step", int64_t(0)), get("position", 0), get("draft", std::vector<int>()),
                             get("accepted", 0), get("acceptance_rate", 0.0)};
        if (t == "timing")
            return TimingRecord{get("step", int64_t(0)), get("phase", std::string()), get("seconds", 0.0),
                                get("tokens", 0), get("tokens_per_s", 0.0)};
        if (t == "train")
            return TrainRecord{get("step", int64_t(0)), get("loss", 0.0),      get("mtp_loss", 0.0),
                               get("aux_loss", 0.0),    get("lr", 0.0),        get("grad_norm", 0.0),
                               get("tokens_per_s", 0.0), get("maxvio_batch", 0.0)};
        if (t == "eval") return EvalRecord{get("step", int64_t(0)), get("val_loss", 0.0), get("maxvio_global", 0.0)};
        if (t == "evaluation") {
            auto run = [](const json& o) {
                if (!o.is_object()) throw FormatError("evaluation record: a run is not an object");
                PerplexityRun p;
                p.windows = o.value("windows", 0);
                p.tokens = o.value("tokens", int64_t(0));
                p.cross_entropy = o.value("cross_entropy", 0.0);
                p.mtp_tokens = o.value("mtp_tokens", int64_t(0));
                p.mtp_cross_entropy = o.value("mtp_cross_entropy", 0.0);
                return p;
            };
            EvaluationRecord r;
            r.step = get("step", int64_t(0));
            r.corpus = get("corpus", std::string());
            r.context = get("context", 0);
            r.text_tokens = get("text_tokens", int64_t(0));
            r.baseline = run(j.at("baseline"));
            r.ablated = j.contains("with_ablation");
            if (r.ablated) {
                r.with_ablation = run(j["with_ablation"]);
                r.ablation = get("ablation", std::string());
                for (const json& h : j.contains("hurt") ? j["hurt"] : json::array())
                    r.hurt.push_back({h.at("token").get<int>(), h.value("text", std::string()), h.value("count", int64_t(0)),
                                      h.value("baseline", 0.0), h.value("ablated", 0.0), h.value("added", 0.0)});
            }
            for (const json& p : j.contains("sweep") ? j["sweep"] : json::array()) r.sweep.push_back(run(p));
            r.sweep_layers = get("sweep_layers", std::vector<int>());
            r.sweep_experts = get("sweep_experts", std::vector<int>());
            r.sweep_expert_layer = get("sweep_expert_layer", -1);
            if (!r.sweep_layers.empty() && r.sweep_layers.size() != r.sweep.size())
                throw FormatError("evaluation record: sweep_layers does not match sweep");
            if (!r.sweep_experts.empty() && (r.sweep_experts.size() != r.sweep.size() || !r.sweep_layers.empty()))
                throw FormatError("evaluation record: sweep_experts does not match sweep");
            return r;
        }
    } catch (const json::exception& e) {
        throw FormatError("record of type '" + t + "': " + e.what());
    }
    throw FormatError("unknown record type '" + t + "'");
}

JsonlWriter::JsonlWriter(const std::filesystem::path& path) : out_(path, std::ios::trunc), path_(path.string()) {
    if (!out_) throw FormatError(path_ + ": cannot create the telemetry file");
}

void JsonlWriter::record(const Record& r) {
    std::string line = to_json(r).dump();
    std::lock_guard<std::mutex> lock(mu_);
    out_ << line << '\n';
}

void JsonlWriter::flush() {
    std::lock_guard<std::mutex> lock(mu_);
    out_.flush();
    if (!out_) throw FormatError(path_ + ": write failed (disk full?)");
}

void MemorySink::record(const Record& r) {
    std::lock_guard<std::mutex> lock(mu_);
    records_.push_back(r);
}

void MemorySink::record(Record&& r) {
    std::lock_guard<std::mutex> lock(mu_);
    records_.push_back(std::move(r));
}

std::vector<Record> MemorySink::take() {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<Record> out;
    out.swap(records_);
    return out;
}

std::vector<Record> MemorySink::snapshot() const {
    std::lock_guard<std::mutex> lock(mu_);
    return records_;
}

std::vector<Record> read_trace(const std::filesystem::path& path) {
    std::ifstream in(path);
    if (!in) throw FormatError(path.string() + ": cannot open the trace");
    std::vector<Record> out;
    std::string line;
    int n = 0;
    while (std::getline(in, line)) {
        ++n;
        if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
        try {
            out.push_back(record_from_json(json::parse(line)));
        } catch (const json::exception& e) {
            throw FormatError(path.string() + ": line " + std::to_string(n) + ": invalid JSON: " + e.what());
        } catch (const FormatError& e) {
            throw FormatError(path.string() + ": line " + std::to_string(n) + ": " + e.what());
        }
    }
    return out;
}

double max_violation(const std::vector<int64_t>& counts) {
    if (counts.empty()) return 0.0;
    double sum = 0, mx = 0;
    for (auto c : counts) {
        sum += double(c);
        mx = std::max(mx, double(c));
    }
    if (sum <= 0) return 0.0;
    return mx / (sum / double(counts.size())) - 1.0;
}

void write_npy(const std::filesystem::path& path, const std::string& dtype, const std::vector<int64_t>& shape,
               const void* data, size_t bytes) {
    std::string shp = "(";
    for (size_t i = 0; i < shape.size(); ++i) shp += std::to_string(shape[i]) + (shape.size() == 1 ? "," : (i + 1 < shape.size() ? ", " : ""));
    shp += ")";
    std::string header = "{'descr': '" + dtype + "', 'fortran_order': False, 'shape': " + shp + ", }";
    const size_t pre = 10;  // magic(6) + version(2) + header length(2)
    size_t total = pre + header.size() + 1;
    header.append((64 - total % 64) % 64, ' ');
    header.push_back('\n');
    std::string out = std::string("\x93NUMPY", 6) + '\x01' + '\x00';
    uint16_t hl = uint16_t(header.size());
    out.push_back(char(hl & 0xff));
    out.push_back(char(hl >> 8));
    out += header;
    out.append(static_cast<const char*>(data), bytes);
    write_file_atomic(path, out);
}

void export_routed_experts_npy(const std::filesystem::path& path, const std::vector<RouteRecord>& routes) {
    if (routes.empty()) throw Error("no routing recorded to export");
    const size_t L = routes[0].layers.size(), k = size_t(routes[0].k);
    std::vector<int32_t> v;
    for (const auto& r : routes) {
        if (r.layers.size() != L || size_t(r.k) != k) throw Error("routing records differ in shape");
        for (int id : r.ids) v.push_back(id);
    }
    write_npy(path, "<i4", {int64_t(routes.size()), int64_t(L), int64_t(k)}, v.data(), v.size() * 4);
}

void export_routed_experts_csv(const std::filesystem::path& path, const std::vector<RouteRecord>& routes) {
    std::ostringstream o;
    o << "step,position,token,layer,slot,expert,weight\n";
    for (const auto& r : routes)
        for (size_t l = 0; l < r.layers.size(); ++l)
            for (int s = 0; s < r.k; ++s)
                o << r.step << ',' << r.position << ',' << r.token << ',' << r.layers[l] << ',' << s << ','
                  << r.ids[l * size_t(r.k) + size_t(s)] << ',' << r.weights[l * size_t(r.k) + size_t(s)] << '\n';
    write_file_atomic(path, o.str());
}

namespace {
// steps in order, layers in order of first appearance: [steps][layers] -> counts
struct LoadGrid {
    std::vector<int64_t> steps;
    std::vector<int> layers;
    size_t E = 0;
    std::vector<int64_t> v;  // [steps, layers, E]
};
LoadGrid grid(const std::vector<LoadRecord>& loads) {
    LoadGrid g;
    std::map<int64_t, size_t> si;
    std::map<int, size_t> li;
    for (const auto& r : loads) {
        if (!si.count(r.step)) si[r.step] = 0;
        if (!li.count(r.layer)) {
            li[r.layer] = g.layers.size();
            g.layers.push_back(r.layer);
        }
        g.E = std::max(g.E, r.counts.size());
    }
    size_t i = 0;
    for (auto& [s, idx] : si) {
        idx = i++;
        g.steps.push_back(s);
    }
    g.v.assign(g.steps.size() * g.layers.size() * g.E, 0);
    for (const auto& r : loads) {
        size_t base = (si[r.step] * g.layers.size() + li[r.layer]) * g.E;
        for (size_t e = 0; e < r.counts.size(); ++e) g.v[base + e] = r.counts[e];
    }
    return g;
}
}  // namespace

void export_load_npy(const std::filesystem::path& path, const std::vector<LoadRecord>& loads) {
    if (loads.empty()) throw Error("no expert load recorded to export");
    LoadGrid g = grid(loads);
    write_npy(path, "<i8", {int64_t(g.steps.size()), int64_t(g.layers.size()), int64_t(g.E)}, g.v.data(),
              g.v.size() * 8);
}

void export_load_csv(const std::filesystem::path& path, const std::vector<LoadRecord>& loads) {
    std::ostringstream o;
    o << "step,layer,expert,count\n";
    for (const auto& r : loads)
        for (size_t e = 0; e < r.counts.size(); ++e) o << r.step << ',' << r.layer << ',' << e << ',' << r.counts[e] << '\n';
    write_file_atomic(path, o.str());
}

}  // namespace moescope
