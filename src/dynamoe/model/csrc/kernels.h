// The inner loops, included by decode.cpp once per instruction set inside a namespace that defines Lanes (16 fp32
// values) and zero, load, fmadd (scalar times lanes plus lanes), multiply_add (lanes times lanes plus lanes), add,
// mul, sum (of the 16 values) and store on them; and for int8 weights Ints (16 int32 sums), Wide (16 columns of a
// row pair as int16), izero, widen_pair (32 int8 weights: two rows of 16 columns), widen_single (one row, its
// partner 0), madd (Ints += Wide times an int16 pair of x, per column) and to_lanes (Ints to fp32).

// One pass over the rows of fp32 panels.
//
// outs[k][0:16] += scale * sum_r x_k[r] * panel_k[r][0:16] for k < kCount (a null scale is 1), either for kCount
// panels and one row x, or (kRowsOfOnePanel) for kCount rows of x, x_stride apart, and panels[0], whose every
// weight row, loaded once, serves them all. Reading four panels at once streams fastest (several memory streams
// in flight: about 23 GB/s on one core here, against 17 for one). non_temporal: weights that will not be read again
// before the caches have cycled (see Panels) are fetched with the non-temporal hint, so that they do not evict what
// will be (the KV cache, activations, the interpreter between steps).
template <bool kRowsOfOnePanel, int kCount>
inline void pass(const float* x, int64_t x_stride, const float* const* panels, int64_t rows, const float* const* scales,
                 float* const* outs, bool non_temporal) {
  Lanes sums[kCount];
  for (Lanes& sum : sums) sum = zero();
  for (int64_t r = 0; r < rows; ++r) {
    if constexpr (kRowsOfOnePanel) {
      const Lanes w = load(panels[0] + r * kPanel);
      for (int k = 0; k < kCount; ++k) sums[k] = fmadd(x[k * x_stride + r], w, sums[k]);
    } else {
      for (int k = 0; k < kCount; ++k) {
        if (non_temporal) __builtin_prefetch(panels[k] + (r + kAheadRows) * kPanel, 0, 0);
        sums[k] = fmadd(x[r], load(panels[k] + r * kPanel), sums[k]);
      }
    }
  }
  for (int k = 0; k < kCount; ++k) {
    const float* scale = scales[kRowsOfOnePanel ? 0 : k];
    store(outs[k], add(load(outs[k]), scale ? mul(sums[k], load(scale)) : sums[k]));
  }
}

// The same pass over int8 panels, in integer arithmetic: x comes as int16 values with one fp32 scale per block of
// kBlockPairs row pairs (Quantized), the panels' rows interleaved in pairs (a column's rows 2p and 2p + 1 side by
// side, a last odd row alone: native.to_panels), so that one multiply-add of 16-bit values takes two rows of 16
// columns into 32-bit sums. The sums are exact within a block and scaled into fp32 at its end. Widening int8 to
// fp32 instead cost three instructions per 16 weights and ran at half the speed the cache delivers.
template <bool kRowsOfOnePanel, int kCount>
inline void pass_int8(const int16_t* xq, int64_t xq_stride, const float* x_scales, int64_t scale_stride,
                      const int8_t* const* panels, int64_t rows, const float* const* scales, float* const* outs) {
  Lanes sums[kCount];
  for (Lanes& sum : sums) sum = zero();
  const int64_t pairs = rows / 2;
  auto add_unit = [&](Ints* accs, int64_t unit, auto widen) {  // row pair `unit` (or the odd last row) of every output
    if constexpr (kRowsOfOnePanel) {
      const Wide w = widen(panels[0] + unit * 2 * kPanel);
      for (int k = 0; k < kCount; ++k) accs[k] = madd(w, xq + k * xq_stride + 2 * unit, accs[k]);
    } else {
      for (int k = 0; k < kCount; ++k) accs[k] = madd(widen(panels[k] + unit * 2 * kPanel), xq + 2 * unit, accs[k]);
    }
  };
  for (int64_t first = 0, block = 0; 2 * first < rows; first += kBlockPairs, ++block) {
    Ints accs[kCount];
    for (Ints& acc : accs) acc = izero();
    const int64_t last = std::min(pairs, first + kBlockPairs);
    for (int64_t unit = first; unit < last; ++unit) add_unit(accs, unit, [](const int8_t* p) { return widen_pair(p); });
    if (rows % 2 && pairs < first + kBlockPairs) add_unit(accs, pairs, [](const int8_t* p) { return widen_single(p); });
    for (int k = 0; k < kCount; ++k) {
      sums[k] = fmadd(x_scales[(kRowsOfOnePanel ? k * scale_stride : 0) + block], to_lanes(accs[k]), sums[k]);
    }
  }
  for (int k = 0; k < kCount; ++k) {
    const float* scale = scales[kRowsOfOnePanel ? 0 : k];
    store(outs[k], add(load(outs[k]), mul(sums[k], load(scale))));
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
