// One panel of a matrix product, included by decode.cpp once per instruction set, inside a namespace that
// defines Lanes (16 fp32 values) and zero, load (fp32 or int8), fmadd, add, mul and store on them.
//
// out[n][0:16] += scale[0:16] * sum_r x[n][r] * panel[r][0:16] for kRows rows n of x (a null scale is 1).
// One row: four independent sums over rows r, r+1, r+2, r+3, since the adds of one sum wait on each
// other. Several rows: each weight row, loaded once, serves them all, one sum per row of x.

template <int kRows, typename W>
inline void panel(const float* x, int64_t x_stride, const W* panel, int64_t rows, const float* scale, float* out,
                  int64_t out_stride) {
  Lanes sums[4] = {zero(), zero(), zero(), zero()};
  int64_t r = 0;
  if constexpr (kRows == 1) {
    for (; r + 4 <= rows; r += 4) {
      for (int s = 0; s < 4; ++s) sums[s] = fmadd(x[r + s], load(panel + (r + s) * kPanel), sums[s]);
    }
    for (; r < rows; ++r) sums[0] = fmadd(x[r], load(panel + r * kPanel), sums[0]);
    sums[0] = add(add(sums[0], sums[1]), add(sums[2], sums[3]));
  } else {
    for (; r < rows; ++r) {
      const Lanes w = load(panel + r * kPanel);
      for (int n = 0; n < kRows; ++n) sums[n] = fmadd(x[n * x_stride + r], w, sums[n]);
    }
  }
  for (int n = 0; n < kRows; ++n) {
    float* o = out + n * out_stride;
    store(o, add(load(o), scale ? mul(sums[n], load(scale)) : sums[n]));
  }
}
