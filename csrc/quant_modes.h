// Quantization modes of w4a8_backend, mirrored from w4a8_backend/formats/modes.py.
//
// The integer values are part of the contract between the Python package and any C++/CUDA code
// that receives a mode as an int (custom-op arguments, kernel template parameters).
// tests/test_modes.py parses this header and fails when it and the Python enums drift apart:
// change both together.
#pragma once

#include <cstdint>

namespace w4a8 {

// quant_algo values a checkpoint may carry (the enumerator name is the string in the config).
enum class QuantAlgo : int32_t {
  W4A8_MXFP4_FP8 = 1,   // ModelOpt 0.47's preset
  W4A8_MXFP4_INT8 = 2,  // this project's format: same weights, INT8 activations
};

// Activation element type fed to the tensor cores.
enum class ActivationDtype : int32_t {
  FP8_E4M3 = 1,
  INT8 = 2,
};

// How the activation scale is obtained.
enum class ActivationScheme : int32_t {
  STATIC_PER_TENSOR = 1,   // checkpoint input_scale
  DYNAMIC_PER_TENSOR = 2,  // amax of the whole input, per call
  DYNAMIC_PER_TOKEN = 3,   // amax of each row, per call
};

// MXFP4 format constants (w4a8_backend/formats/mxfp4.py).
constexpr int kMxfp4BlockSize = 32;
constexpr int kE8M0Bias = 127;
constexpr int kE8M0Nan = 0xFF;

}  // namespace w4a8
