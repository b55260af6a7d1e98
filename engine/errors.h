// Typed errors of the engine. Messages name the file, tensor or field, what was expected
// and what was found; library code throws, never exits.
#pragma once
#include <stdexcept>
#include <string>

namespace moescope {

struct Error : std::runtime_error {
    using std::runtime_error::runtime_error;
};
struct FormatError : Error {  // a malformed file (safetensors, JSON, tokenizer)
    using Error::Error;
};
struct ShapeError : Error {  // a tensor whose shape disagrees with the config
    using Error::Error;
};
struct ConfigError : Error {  // a missing, mistyped or inconsistent config field
    using Error::Error;
};
struct DeviceError : Error {  // the GPU backend cannot run (no device, out of memory)
    using Error::Error;
};
struct ContextError : Error {  // a prompt or generation past the context limit
    using Error::Error;
};
struct CancelledError : Error {  // a generation stopped from another thread
    using Error::Error;
};

}  // namespace moescope
