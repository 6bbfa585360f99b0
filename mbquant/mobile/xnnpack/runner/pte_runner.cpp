// mbquant's ExecuTorch runner: the C++ runtime API an Android app's native layer calls (FileDataLoader ->
// Program::load -> memory-planned buffers from MethodMeta -> load_method("forward") -> set_input -> execute ->
// get_output), for a batch of images in one process. Built against the runtime in the executorch wheel, for the
// host and cross-built for aarch64 (run under qemu-aarch64-static): no torch, no Python.
//
//   pte_runner MODEL.pte INPUTS.bin OUTPUTS.bin
//   pte_runner --describe MODEL.pte          prints "input <dtype> <d0>x<d1>x..." and "output ..." and exits
//
// INPUTS.bin:  "MBQI" int32 n c h w, then n*c*h*w float32 (NCHW, preprocessed as the bundle's preprocess.json)
// OUTPUTS.bin: "MBQO" int32 n k, then n*k float32 logits
// Every execute gets a fresh copy of its input (a program may write into its input buffer).

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <vector>

#include <executorch/extension/data_loader/file_data_loader.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/core/evalue.h>
#include <executorch/runtime/executor/method.h>
#include <executorch/runtime/executor/program.h>
#include <executorch/runtime/platform/runtime.h>

using executorch::extension::FileDataLoader;
using executorch::extension::from_blob;
using executorch::runtime::Error;
using executorch::runtime::HierarchicalAllocator;
using executorch::runtime::MemoryAllocator;
using executorch::runtime::MemoryManager;
using executorch::runtime::Method;
using executorch::runtime::MethodMeta;
using executorch::runtime::Program;
using executorch::runtime::Result;
using executorch::runtime::Span;

namespace {

int fail(const char* what, int code) {
  std::fprintf(stderr, "pte_runner: %s\n", what);
  return code;
}

bool read_exact(FILE* f, void* dst, size_t n) { return std::fread(dst, 1, n, f) == n; }

}  // namespace

void describe(const char* what, executorch::runtime::Result<executorch::runtime::TensorInfo> info) {
  if (!info.ok()) {
    std::printf("%s none\n", what);
    return;
  }
  std::printf("%s %d", what, static_cast<int>(info->scalar_type()));
  const auto sizes = info->sizes();
  for (size_t i = 0; i < sizes.size(); ++i) {
    std::printf("%s%d", i == 0 ? " " : "x", static_cast<int>(sizes[i]));
  }
  std::printf("\n");
}

int main(int argc, char** argv) {
  const bool describing = argc == 3 && std::strcmp(argv[1], "--describe") == 0;
  if (argc != 4 && !describing) {
    return fail("usage: pte_runner MODEL.pte INPUTS.bin OUTPUTS.bin | pte_runner --describe MODEL.pte", 2);
  }
  const char* model = describing ? argv[2] : argv[1];
  executorch::runtime::runtime_init();
  Result<FileDataLoader> loader = FileDataLoader::from(model);
  if (!loader.ok()) {
    return fail("cannot open the program file", 3);
  }
  Result<Program> program = Program::load(&loader.get());
  if (!program.ok()) {
    return fail("the file is not a valid ExecuTorch program", 3);
  }
  Result<MethodMeta> meta = program->method_meta("forward");
  if (!meta.ok()) {
    return fail("the program has no 'forward' method", 3);
  }
  if (describing) {  // scalar type codes as in ExecuTorch's ScalarType (6 = float32, 1 = int8)
    describe("input", meta->input_tensor_meta(0));
    describe("output", meta->output_tensor_meta(0));
  }
  std::vector<std::unique_ptr<uint8_t[]>> buffers;
  std::vector<Span<uint8_t>> spans;
  for (size_t i = 0; i < meta->num_memory_planned_buffers(); ++i) {
    size_t size = static_cast<size_t>(meta->memory_planned_buffer_size(i).get());
    buffers.emplace_back(new uint8_t[size]);
    spans.emplace_back(buffers.back().get(), size);
  }
  HierarchicalAllocator planned({spans.data(), spans.size()});
  std::vector<uint8_t> pool(4 * 1024 * 1024);
  MemoryAllocator method_allocator(pool.size(), pool.data());
  MemoryManager memory(&method_allocator, &planned);
  Result<Method> method = program->load_method("forward", &memory);
  if (!method.ok()) {
    return fail("cannot load method 'forward' (a backend or kernel missing?)", 3);
  }
  if (describing) {
    return 0;
  }

  FILE* in = std::fopen(argv[2], "rb");
  if (in == nullptr) {
    return fail("cannot open the inputs file", 4);
  }
  char magic[4];
  int32_t dims[4];
  if (!read_exact(in, magic, 4) || std::memcmp(magic, "MBQI", 4) != 0 || !read_exact(in, dims, sizeof(dims))) {
    return fail("the inputs file has no MBQI header", 4);
  }
  const int32_t n = dims[0];
  const size_t per_image = static_cast<size_t>(dims[1]) * dims[2] * dims[3];
  FILE* out = std::fopen(argv[3], "wb");
  if (out == nullptr) {
    return fail("cannot write the outputs file", 4);
  }
  std::vector<float> image(per_image);
  int32_t classes = -1;
  for (int32_t i = 0; i < n; ++i) {
    if (!read_exact(in, image.data(), per_image * sizeof(float))) {
      return fail("the inputs file is shorter than its header says", 4);
    }
    std::vector<float> fresh(image);  // a fresh input buffer for every execute
    auto tensor = from_blob(fresh.data(), {1, dims[1], dims[2], dims[3]});
    if (method->set_input(tensor, 0) != Error::Ok) {
      return fail("set_input failed (input shape or dtype does not match the program)", 5);
    }
    if (method->execute() != Error::Ok) {
      return fail("execute failed", 5);
    }
    const auto logits = method->get_output(0).toTensor();
    if (classes < 0) {
      classes = static_cast<int32_t>(logits.numel());
      int32_t header[2] = {n, classes};
      std::fwrite("MBQO", 1, 4, out);
      std::fwrite(header, sizeof(int32_t), 2, out);
    }
    std::fwrite(logits.const_data_ptr<float>(), sizeof(float), classes, out);
  }
  std::fclose(in);
  return std::fclose(out) == 0 ? 0 : fail("writing the outputs failed", 4);
}
