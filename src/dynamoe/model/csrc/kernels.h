// The inner loops, included by decode.cpp once per instruction set inside a namespace that defines Lanes (16 fp32
// values) and zero, load (fp32 or int8), fmadd (scalar times lanes plus lanes), multiply_add (lanes times lanes
// plus lanes), add, mul, sum (of the 16 values) and store on them.

// One pass over the rows of panels.
//
// outs[k][0:16] += scale * sum_r x_k[r] * panel_k[r][0:16] for k < kCount (a null scale is 1), either for kCount
// panels and one row x, or (kRowsOfOnePanel) for kCount rows of x, x_stride apart, and panels[0], whose every
// weight row, loaded once, serves them all. Each output sums its rows in kSplit independent sums (rows r, r + 1,
// ... in turn), since the adds of one sum wait on each other. Which layout reads fastest was measured here
// (one core): fp32 streams best as four panels at once (several memory streams in flight: about 23 GB/s,
// against 17 for one), int8, whose conversion costs more than its bytes, as one panel in four sums.
template <bool kRowsOfOnePanel, int kCount, int kSplit, typename W>
inline void pass(const float* x, int64_t x_stride, const W* const* panels, int64_t rows, const float* const* scales,
                 float* const* outs) {
  Lanes sums[kCount][kSplit];
  for (auto& split : sums) {
    for (Lanes& sum : split) sum = zero();
  }
  auto row = [&](int64_t r, int s) {
    if constexpr (kRowsOfOnePanel) {
      const Lanes w = load(panels[0] + r * kPanel);
      for (int k = 0; k < kCount; ++k) sums[k][s] = fmadd(x[k * x_stride + r], w, sums[k][s]);
    } else {
      for (int k = 0; k < kCount; ++k) sums[k][s] = fmadd(x[r], load(panels[k] + r * kPanel), sums[k][s]);
    }
  };
  int64_t r = 0;
  for (; r + kSplit <= rows; r += kSplit) {
    for (int s = 0; s < kSplit; ++s) row(r + s, s);
  }
  for (; r < rows; ++r) row(r, 0);
  for (int k = 0; k < kCount; ++k) {
    Lanes sum = sums[k][0];
    for (int s = 1; s < kSplit; ++s) sum = add(sum, sums[k][s]);
    const float* scale = scales[kRowsOfOnePanel ? 0 : k];
    store(outs[k], add(load(outs[k]), scale ? mul(sum, load(scale)) : sum));
  }
}

// a . b over n values.
inline float dot(const float* a, const float* b, int64_t n) {
  Lanes sums = zero();
  int64_t i = 0;
  for (; i + kPanel <= n; i += kPanel) sums = multiply_add(load(a + i), load(b + i), sums);
  float total = sum(sums);
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

// out[0:n] += weight * v[0:n].
inline void accumulate(float weight, const float* v, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + kPanel <= n; i += kPanel) store(out + i, fmadd(weight, load(v + i), load(out + i)));
  for (; i < n; ++i) out[i] += weight * v[i];
}

// One query head over `positions` cached keys and values of its key-value head (rows head_dim apart):
// out += softmax(keys . q * scale) @ values, with scores as scratch.
inline void attend(const float* q, const float* keys, const float* values, int64_t positions, int64_t head_dim,
                   float scale, float* scores, float* out) {
  for (int64_t t = 0; t < positions; ++t) scores[t] = dot(q, keys + t * head_dim, head_dim) * scale;
  softmax(scores, positions);
  for (int64_t t = 0; t < positions; ++t) accumulate(scores[t], values + t * head_dim, out, head_dim);
}
