// Run a library written by `dcgraph compile -o LIB.so` with TVM's C++ runtime: no Python, no
// compiler, what an edge application links against (libtvm_runtime.so + libtvm_ffi.so).
//
//   run_model LIB.so INPUT.f32 N,C,H,W OUTPUT.f32 [ENTRY]
//
// INPUT.f32 holds the float32 input, C order, the shape given as N,C,H,W (numpy: x.tofile());
// the model's first output is written to OUTPUT.f32 and its shape printed. ENTRY is the VM
// function to call: "main" (the compiled batch) or a batch bucket's "main_b<N>" of a model
// compiled with --max-batch (LIB.so.json lists them). Build, with the wheel's headers
// (TVM=.../site-packages/tvm, FFI=.../site-packages/tvm_ffi):
//
//   g++ -std=c++17 -O2 run_model.cc -I$TVM/include -I$FFI/include -I$FFI/3rdparty/dlpack/include \
//       -L$TVM/lib -L$FFI/lib -ltvm_runtime -ltvm_ffi -Wl,-rpath,$TVM/lib:$FFI/lib -o run_model
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <new>
#include <stdexcept>
#include <sstream>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;
using ffi::Tensor;

// Host memory for a tensor, 64-byte aligned: what TVM's generated kernels assume of their inputs.
struct AlignedAlloc {
  void AllocData(DLTensor* t) {
    size_t bytes = (ffi::GetDataSize(*t) + 63) / 64 * 64;
    t->data = std::aligned_alloc(64, bytes ? bytes : 64);
    if (t->data == nullptr) throw std::bad_alloc();
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

static ffi::Function Get(const ffi::Module& mod, const std::string& name) {
  ffi::Optional<ffi::Function> fn = mod->GetFunction(name);
  if (!fn.has_value()) throw std::runtime_error("the library has no function " + name);
  return fn.value();
}

int main(int argc, char** argv) {
  if (argc < 5) {
    std::cerr << "usage: run_model LIB.so INPUT.f32 N,C,H,W OUTPUT.f32 [ENTRY]\n";
    return 2;
  }
  try {
    std::vector<int64_t> shape;
    std::stringstream dims(argv[3]);
    for (std::string d; std::getline(dims, d, ',');) shape.push_back(std::stoll(d));
    int64_t count = 1;
    for (int64_t d : shape) count *= d;

    std::vector<float> input(count);
    std::ifstream in(argv[2], std::ios::binary);
    if (!in.read(reinterpret_cast<char*>(input.data()), count * sizeof(float)))
      throw std::runtime_error(std::string("cannot read ") + std::to_string(count) + " floats from " + argv[2]);

    // The Relax VM: load the executable, then one CPU device with the pooled allocator (2).
    DLDevice cpu{kDLCPU, 0};
    ffi::Module lib = ffi::Module::LoadFromFile(argv[1]);
    ffi::Module vm = Get(lib, "vm_load_executable")().cast<ffi::Module>();
    Get(vm, "vm_initialization")(static_cast<int>(kDLCPU), 0, 2);

    Tensor x = Tensor::FromNDAlloc(AlignedAlloc(), ffi::Shape(shape), DLDataType{kDLFloat, 32, 1}, cpu);
    std::memcpy(x.data_ptr(), input.data(), count * sizeof(float));
    ffi::Any result = Get(vm, argc > 5 ? argv[5] : "main")(x);
    // one output is a tensor; several come as a tuple (an ffi Array): take the first
    Tensor y = result.as<Tensor>() ? result.cast<Tensor>()
                                   : result.cast<ffi::Array<ffi::Any>>()[0].cast<Tensor>();

    int64_t out_count = 1;
    std::cout << "output shape";
    for (int i = 0; i < y.ndim(); ++i) {
      out_count *= y.size(i);
      std::cout << (i ? "," : " ") << y.size(i);
    }
    std::cout << "\n";
    if (y.dtype().code != kDLFloat || y.dtype().bits != 32 || y.device().device_type != kDLCPU)
      throw std::runtime_error("the first output is not a float32 host tensor");
    std::ofstream out(argv[4], std::ios::binary);
    out.write(static_cast<const char*>(y.data_ptr()) + y.GetDLTensorPtr()->byte_offset, out_count * sizeof(float));
    if (!out) throw std::runtime_error(std::string("cannot write ") + argv[4]);
  } catch (const std::exception& e) {
    std::cerr << "run_model: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
