// Shared by bindings_cpu.cpp and bindings_cuda.cpp: tensors cross the Python boundary as raw
// addresses (Python ints from Tensor.data_ptr(), 0 = null), and the CPU and CUDA argument structs
// of each op name their fields alike, so one converter per op fills either. Includes no torch, CUDA
// or pybind11 header.
#pragma once

#include <cstdint>

namespace astromer_fast {
namespace bindings {

template <class T>
T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// Points `field` at `address`, whatever the field's pointee type (float, void, std::uint8_t, ...).
template <class T>
void set_ptr(T*& field, std::uintptr_t address) {
  field = as_ptr<T>(address);
}

template <class Args>
Args input_embedding_args(std::uintptr_t t, std::uintptr_t m, std::uintptr_t hidden,
                          std::uintptr_t w, std::uintptr_t b, std::uintptr_t token, double base,
                          std::int64_t rows, std::int64_t dim, std::uintptr_t out) {
  Args a;
  set_ptr(a.t, t);
  set_ptr(a.m, m);
  set_ptr(a.hidden, hidden);
  set_ptr(a.w, w);
  set_ptr(a.b, b);
  set_ptr(a.token, token);
  a.base = base;
  a.rows = rows;
  a.dim = dim;
  set_ptr(a.out, out);
  return a;
}

template <class Args>
Args weighted_rmse_args(std::uintptr_t pred, bool pred_bf16, std::uintptr_t target,
                        std::uintptr_t err, std::uintptr_t probed, std::uintptr_t valid,
                        std::int64_t rows, std::int64_t length, std::uintptr_t loss,
                        std::uintptr_t scale, std::uintptr_t dir) {
  Args a;
  set_ptr(a.pred, pred);
  a.pred_bf16 = pred_bf16;
  set_ptr(a.target, target);
  set_ptr(a.err, err);
  set_ptr(a.probed, probed);
  set_ptr(a.valid, valid);
  a.rows = rows;
  a.length = length;
  set_ptr(a.loss, loss);
  set_ptr(a.scale, scale);
  set_ptr(a.dir, dir);
  return a;
}

// The forward arguments of masked attention (also the `fwd` part of the backward ones).
template <class Args>
Args masked_attention_args(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v,
                           std::uintptr_t key_hidden, std::int64_t batch, std::int64_t heads,
                           std::int64_t length, std::int64_t head_dim, int rule, double scale,
                           std::uintptr_t out, std::uintptr_t lse) {
  Args a;
  set_ptr(a.q, q);
  set_ptr(a.k, k);
  set_ptr(a.v, v);
  set_ptr(a.key_hidden, key_hidden);
  a.batch = batch;
  a.heads = heads;
  a.length = length;
  a.head_dim = head_dim;
  a.rule = rule;
  a.scale = static_cast<float>(scale);
  set_ptr(a.out, out);
  set_ptr(a.lse, lse);
  return a;
}

// The gradient buffers of the masked attention backward (`fwd` is filled separately).
template <class Args>
void set_masked_attention_grads(Args& g, std::uintptr_t dout, std::uintptr_t dq, std::uintptr_t dk,
                                std::uintptr_t dv) {
  set_ptr(g.dout, dout);
  set_ptr(g.dq, dq);
  set_ptr(g.dk, dk);
  set_ptr(g.dv, dv);
}

}  // namespace bindings
}  // namespace astromer_fast
