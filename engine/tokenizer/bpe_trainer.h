// Byte-level BPE training (DeepSeek-V3's pre-tokenization) writing a Hugging Face
// tokenizer.json + tokenizer_config.json that both moescope and `tokenizers` load.
#pragma once
#include <cstddef>
#include <filesystem>
#include <string>
#include <vector>

namespace moescope {

struct BpeTrainerOptions {
    int vocab_size = 4096;  // special tokens + 256 bytes + merges
    // Special tokens get the first ids, in this order. The first four name moescope's chat
    // format (see chat_template.h); the chat template is written only when all are present.
    std::vector<std::string> special_tokens = {"<|bos|>", "<|eos|>", "<|pad|>",
                                               "<|system|>", "<|user|>", "<|assistant|>"};
    int min_frequency = 2;  // stop when the best pair occurs fewer times than this
};

struct BpeTrainStats {
    int vocab_size = 0, merges = 0;
    size_t corpus_bytes = 0, distinct_words = 0;
    double seconds = 0;
};

struct TrainedTokenizer {
    std::string tokenizer_json, tokenizer_config_json;
    BpeTrainStats stats;
};

// In memory: trains on the given documents.
TrainedTokenizer train_bpe_json(const std::vector<std::string>& documents, const BpeTrainerOptions& options);

// Trains on text files and writes out_dir/tokenizer.json and out_dir/tokenizer_config.json
// (each through a temporary file and a rename, so readers never see half a file).
BpeTrainStats train_bpe(const std::vector<std::filesystem::path>& corpus, const BpeTrainerOptions& options,
                        const std::filesystem::path& out_dir);

}  // namespace moescope
