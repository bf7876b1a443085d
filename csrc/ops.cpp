// Op schemas for dfmu_ext: declared once here, implemented per dispatch key in cpu/ and cuda/.
#ifndef DFMU_NO_PYTHON
#include <Python.h>
#endif
#include <torch/library.h>


#ifndef DFMU_NO_PYTHON
extern "C" {
// `import dfmu_ext._C` loads this shared object, which runs the static TORCH_LIBRARY
// registrations below. The module itself is empty: every entry point is a torch op.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

TORCH_LIBRARY(dfmu_ext, m) {
  // out[k, c] = sum_{n : groups[n] == k} r( sum_{positions p != (n, c)} a[n, .., c, ..] * grad[...] )
  // with a = act * act_scale[c] + act_shift[c] (scale 1 and shift 0 when absent: an eval-mode
  // BatchNorm folded into the read, so a norm's output is scored from its input) and
  // r = |.| ("abs"), (.)^2 ("square") or identity ("signed"). Shape (num_groups, C), float32 for
  // half/bfloat16/float32 inputs, float64 for float64. check_groups=false skips the group-id range
  // check (one device sync on CUDA) for callers that validated the ids once; ids outside
  // [0, num_groups) are then ignored, never read out of bounds.
  m.def("block_importance(Tensor act, Tensor grad, Tensor? groups, int num_groups, int channel_dim, "
        "str reduce, Tensor? act_scale=None, Tensor? act_shift=None, bool check_groups=True) -> Tensor");
  // tensors[i] *= masks[i] broadcast along dim 0, in place, every i.
  m.def("apply_channel_masks_(Tensor(a!)[] tensors, Tensor[] masks) -> ()");
}
