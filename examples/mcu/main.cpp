// Firmware sketch: run an mbquant Cortex-M program (`mbquant ptq ... --target mcu --int8-input`) with the
// ExecuTorch runtime and its Cortex-M (CMSIS-NN) kernels, straight from flash.
//
// NOT BUILT OR RUN ON A DEVICE HERE: the ExecuTorch runtime for Cortex-M and the CMSIS-NN sources are not
// available in this environment; tests only syntax-check this file with arm-none-eabi-g++ against the headers
// of the executorch wheel (see examples/mcu/README.md for what firmware must link).
//
// Model: the header mbquant writes beside the .pte (<stem>_pte.h), renamed model_pte.h here.

#include <cstdint>
#include <cstring>

#include <executorch/extension/data_loader/buffer_data_loader.h>
#include <executorch/runtime/core/evalue.h>
#include <executorch/runtime/core/exec_aten/exec_aten.h>
#include <executorch/runtime/core/hierarchical_allocator.h>
#include <executorch/runtime/core/memory_allocator.h>
#include <executorch/runtime/executor/memory_manager.h>
#include <executorch/runtime/executor/method.h>
#include <executorch/runtime/executor/program.h>
#include <executorch/runtime/platform/runtime.h>

#include "model_pte.h"

using executorch::extension::BufferDataLoader;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::HierarchicalAllocator;
using executorch::runtime::MemoryAllocator;
using executorch::runtime::MemoryManager;
using executorch::runtime::Method;
using executorch::runtime::MethodMeta;
using executorch::runtime::Program;
using executorch::runtime::Result;
using executorch::runtime::Span;
using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::aten::TensorImpl;

namespace {

// The activation arena the program planned (activations, CMSIS-NN scratch, input and output), and a small pool
// for the runtime's own bookkeeping (method metadata, tensor headers).
alignas(16) uint8_t planned_arena[MODEL_INT8_ARENA_BYTES];
alignas(16) uint8_t method_pool[16 * 1024];

// Quantize one 8-bit grayscale camera pixel (0..255) into the program's int8 input, with the preprocessing
// the model was trained with (small preset: x = (p / 255 - mean) / std) folded into the input scale/zero point.
int8_t quantize_pixel(float normalized) {
  float q = normalized / MODEL_INT8_INPUT_SCALE + static_cast<float>(MODEL_INT8_INPUT_ZERO_POINT);
  q = q < -128.f ? -128.f : (q > 127.f ? 127.f : q);
  return static_cast<int8_t>(q < 0.f ? q - 0.5f : q + 0.5f);  // round half away from zero
}

}  // namespace

// Classify one image: `image` is NHWC int8 (MODEL_INT8_INPUT_H x W x C), already quantized with quantize_pixel.
// Returns the class index, or -1 on an error (the ExecuTorch error code is logged by the runtime).
// quantize_pixel() above shows how the caller prepares `image`.
int classify(const int8_t* image) {
  executorch::runtime::runtime_init();
  BufferDataLoader loader(model_int8_pte, MODEL_INT8_PTE_SIZE);
  Result<Program> program = Program::load(&loader);
  if (!program.ok()) {
    return -1;
  }
  Result<MethodMeta> meta = program->method_meta("forward");
  if (!meta.ok() || meta->num_memory_planned_buffers() != 1 ||
      meta->memory_planned_buffer_size(0).get() > sizeof(planned_arena)) {
    return -1;
  }
  Span<uint8_t> planned[1] = {{planned_arena, sizeof(planned_arena)}};
  HierarchicalAllocator planned_memory({planned, 1});
  MemoryAllocator method_allocator(sizeof(method_pool), method_pool);
  MemoryManager memory_manager(&method_allocator, &planned_memory);
  Result<Method> method = program->load_method("forward", &memory_manager);
  if (!method.ok()) {
    return -1;
  }
  // The input: int8, NCHW sizes in NHWC memory order (dim order 0, 2, 3, 1); set_input copies it into the
  // planned input buffer.
  TensorImpl::SizesType sizes[4] = {1, MODEL_INT8_INPUT_C, MODEL_INT8_INPUT_H, MODEL_INT8_INPUT_W};
  TensorImpl::DimOrderType dim_order[4] = {0, 2, 3, 1};
  TensorImpl::StridesType strides[4] = {MODEL_INT8_INPUT_H * MODEL_INT8_INPUT_W * MODEL_INT8_INPUT_C, 1,
                                        MODEL_INT8_INPUT_W * MODEL_INT8_INPUT_C, MODEL_INT8_INPUT_C};
  TensorImpl impl(ScalarType::Char, 4, sizes, const_cast<int8_t*>(image), dim_order, strides);
  if (method->set_input(EValue(Tensor(&impl)), 0) != Error::Ok || method->execute() != Error::Ok) {
    return -1;
  }
  auto logits = method->get_output(0).toTensor();   // float logits (the program dequantizes its output)
  const float* scores = logits.const_data_ptr<float>();
  int best = 0;
  for (int i = 1; i < MODEL_INT8_NUM_CLASSES; ++i) {
    if (scores[i] > scores[best]) {
      best = i;
    }
  }
  return best;
}

// The label of a class index (from the header).
const char* label_of(int index) {
  return (index >= 0 && index < MODEL_INT8_NUM_CLASSES) ? model_int8_labels[index] : "?";
}
