// One panel of a matrix-vector product, included by decode.cpp once per instruction set, inside a namespace
// that defines Lanes (16 fp32 values) and zero, load (fp32 or int8), fmadd, add, mul and store on them.
//
// out[0:16] += scale[0:16] * sum_r x[r] * panel[r][0:16] (a null scale is 1). Four independent sums over
// rows r, r+1, r+2, r+3: the adds of one sum wait on each other, four keep the multiply-add units busy.

template <typename W>
inline void panel(const float* x, const W* panel, int64_t rows, const float* scale, float* out) {
  Lanes s0 = zero(), s1 = zero(), s2 = zero(), s3 = zero();
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    const W* p = panel + r * kPanel;
    s0 = fmadd(x[r], load(p), s0);
    s1 = fmadd(x[r + 1], load(p + kPanel), s1);
    s2 = fmadd(x[r + 2], load(p + 2 * kPanel), s2);
    s3 = fmadd(x[r + 3], load(p + 3 * kPanel), s3);
  }
  for (; r < rows; ++r) s0 = fmadd(x[r], load(panel + r * kPanel), s0);
  Lanes sum = add(add(s0, s1), add(s2, s3));
  if (scale) sum = mul(sum, load(scale));
  store(out, add(load(out), sum));
}
