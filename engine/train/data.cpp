// Token stream and windows for training.
#include "engine/train/data.h"

#include <fstream>
#include <sstream>

#include "engine/errors.h"
#include "engine/tokenizer/tokenizer.h"

namespace moescope {

std::vector<int> tokenize_corpus(const std::vector<std::filesystem::path>& files, const Tokenizer* tokenizer) {
    std::vector<int> out;
    for (const auto& f : files) {
        std::ifstream in(f, std::ios::binary);
        if (!in) throw FormatError(f.string() + ": cannot open the corpus file");
        std::stringstream ss;
        ss << in.rdbuf();
        const std::string text = ss.str();
        if (tokenizer) {
            auto ids = tokenizer->encode(text, false, true);
            out.insert(out.end(), ids.begin(), ids.end());
        } else {
            for (unsigned char c : text) out.push_back(int(c));
        }
    }
    return out;
}

TokenDataset::TokenDataset(std::vector<int> tokens, double val_fraction, int seq_len) : tokens_(std::move(tokens)) {
    const int64_t n = int64_t(tokens_.size());
    int64_t val = int64_t(double(n) * val_fraction);
    if (val_fraction > 0) val = std::max<int64_t>(val, seq_len);
    train_end_ = n - val;
    if (train_end_ < seq_len)
        throw ConfigError("corpus: " + std::to_string(n) + " tokens leave " + std::to_string(train_end_) +
                          " for training, fewer than one window of seq_len " + std::to_string(seq_len) +
                          " (use a larger corpus or a smaller --seq-len)");
}

void TokenDataset::sample_batch(std::vector<int>& out, int B, int T, std::mt19937_64& rng) const {
    out.resize(size_t(B) * T);
    const uint64_t starts = uint64_t(train_end_ - T + 1);
    for (int b = 0; b < B; ++b) {
        const int64_t s = int64_t(rng() % starts);
        std::copy(tokens_.begin() + s, tokens_.begin() + s + T, out.begin() + size_t(b) * T);
    }
}

int TokenDataset::validation_windows(std::vector<int>& out, int T, int max_windows) const {
    const int64_t avail = (int64_t(tokens_.size()) - train_end_) / T;
    const int n = int(std::min<int64_t>(avail, max_windows));
    out.assign(tokens_.begin() + train_end_, tokens_.begin() + train_end_ + int64_t(n) * T);
    return n;
}

uint64_t TokenDataset::fingerprint() const {
    uint64_t h = 1469598103934665603ull;
    for (int t : tokens_) {
        h ^= uint64_t(uint32_t(t));
        h *= 1099511628211ull;
    }
    return h;
}

}  // namespace moescope
