// Training data: text files -> tokenizer (or raw bytes) -> one token stream, split into a
// training part and a held-out validation tail; random training windows drawn from a seeded
// generator (its state is the data position a checkpoint stores), fixed validation windows.
#pragma once
#include <cstdint>
#include <filesystem>
#include <random>
#include <vector>

namespace moescope {

class Tokenizer;

// Concatenates the files' token ids. With a tokenizer, special tokens written in the text
// (chat markup such as <|user|>) are parsed; without one every byte is a token id (0..255).
std::vector<int> tokenize_corpus(const std::vector<std::filesystem::path>& files, const Tokenizer* tokenizer);

class TokenDataset {
public:
    TokenDataset() = default;
    // The last val_fraction of the stream (at least one window of seq_len) is validation.
    TokenDataset(std::vector<int> tokens, double val_fraction, int seq_len);

    // B random windows of T tokens from the training part: out[B, T].
    void sample_batch(std::vector<int>& out, int B, int T, std::mt19937_64& rng) const;
    // Up to max_windows consecutive non-overlapping validation windows of T tokens: out[n, T].
    int validation_windows(std::vector<int>& out, int T, int max_windows) const;

    int64_t size() const { return int64_t(tokens_.size()); }
    int64_t train_size() const { return train_end_; }
    uint64_t fingerprint() const;  // FNV-1a of the stream: a resumed run must see the same data
    const std::vector<int>& tokens() const { return tokens_; }

private:
    std::vector<int> tokens_;
    int64_t train_end_ = 0;
};

}  // namespace moescope
