// Host-side harness for the torch-free headers: accurate angles against fp64, pair layout,
// online softmax edge cases. Run by ctest (CMakeLists.txt) on every machine, GPU or not.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "ropekern/online_softmax.h"
#include "ropekern/rope_math.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what, double got = 0.0, double bound = 0.0) {
  if (!ok) {
    std::printf("FAIL %s: %.3g (bound %.3g)\n", what, got, bound);
    ++failures;
  }
}

// Same split as ropekern/scaling.py: split_turns (12 + 12 + 12 bits + the fp32 remainder), from
// the frequency in turns in long double.
double round_bits(long double x, int bits) {
  int e = 0;
  const long double m = std::frexp(x, &e);
  return static_cast<double>(std::ldexp(std::nearbyint(std::ldexp(m, bits)), e - bits));
}

void split(double inv_freq, float out[ropekern::kSplitRows]) {
  long double r = inv_freq / (2.0L * std::acos(-1.0L));
  for (int k = 0; k + 1 < ropekern::kSplitRows; ++k) {
    const double part = round_bits(r, 12);
    out[k] = static_cast<float>(part);
    r -= part;
  }
  out[ropekern::kSplitRows - 1] = static_cast<float>(r);
}

// cos/sin of pos * inv_freq: the product and its reduction modulo 2 pi in long double (64-bit
// mantissa: ~1e-10 rad at position 2^31, far below the 2e-6 bound).
void exact_cos_sin(int32_t pos, double inv_freq, double* c, double* s) {
  const long double two_pi = 2.0L * std::acos(-1.0L);
  long double a = static_cast<long double>(pos) * inv_freq;
  a -= two_pi * std::floor(a / two_pi);
  *c = static_cast<double>(std::cos(a));
  *s = static_cast<double>(std::sin(a));
}

void test_angles() {
  std::mt19937_64 rng(1234);
  std::uniform_int_distribution<int32_t> low_dist(0, (1 << 24) - 1), pos_dist(0, INT32_MAX);
  std::uniform_real_distribution<double> log_freq(-14.0, 0.0);
  double worst_low = 0.0, worst = 0.0, worst_plain = 0.0;
  for (int trial = 0; trial < 400000; ++trial) {
    // the ends of the int32 range and of each chunk boundary, then random positions (half below 2^24)
    const int32_t edges[] = {INT32_MAX, INT32_MAX - 1, (1 << 24) - 1, 1 << 24, (1 << 25) + 3, 1 << 27, (1 << 30) + 5};
    const int n_edges = static_cast<int>(sizeof(edges) / sizeof(edges[0]));
    const int32_t pos = trial < n_edges ? edges[trial] : trial % 2 ? low_dist(rng) : pos_dist(rng);
    const double inv = trial % 7 == 0 ? 1.0 : std::exp(log_freq(rng));
    float table[ropekern::kSplitRows];  // half = 1
    split(inv, table);
    float c = 0.f, s = 0.f;
    ropekern::rope_cos_sin(pos, table, 1, 0, 1.0f, &c, &s);
    double ec = 0.0, es = 0.0;
    exact_cos_sin(pos, inv, &ec, &es);
    const double err = std::fmax(std::fabs(c - ec), std::fabs(s - es));
    worst = std::fmax(worst, err);
    if (pos < (1 << 24)) worst_low = std::fmax(worst_low, err);
    const float plain = static_cast<float>(pos) * static_cast<float>(inv);
    worst_plain = std::fmax(worst_plain, std::fabs(std::cos(plain) - ec));
  }
  std::printf("accurate angles: max |cos/sin error| %.3g below 2^24, %.3g over all int32 (plain fp32 product: %.3g)\n",
              worst_low, worst, worst_plain);
  expect(worst <= 2e-6, "cos/sin error vs exact for every int32 position", worst, 2e-6);
  expect(worst_plain > 1e-2, "plain fp32 baseline is visibly worse (sanity of the test)", worst_plain, 1e-2);
}

void test_identity_and_pairs() {
  float table[ropekern::kSplitRows] = {0.1f, 0.f, 0.f, 0.f};
  float c = 0.f, s = 1.f;
  ropekern::rope_cos_sin(0, table, 1, 0, 1.0f, &c, &s);
  expect(c == 1.0f && s == 0.0f, "position 0 is the identity");
  expect(ropekern::pair_first(3, false) == 3 && ropekern::pair_second(3, 64, false) == 35, "half-split pairs");
  expect(ropekern::pair_first(3, true) == 6 && ropekern::pair_second(3, 64, true) == 7, "interleaved pairs");
  float x1 = 1.f, x2 = 2.f;
  ropekern::rotate_pair(&x1, &x2, 0.f, 1.f);  // quarter turn
  expect(x1 == -2.f && x2 == 1.f, "rotate_pair by 90 degrees");
}

void test_softmax() {
  ropekern::SoftmaxRow row;
  const float alpha = row.update_max(-INFINITY);
  expect(alpha == 0.f && row.inv_sum() == 0.f && row.lse() == -INFINITY, "row with no key: zeros, LSE -inf");
  expect(row.prob(-INFINITY) == 0.f, "masked probability is selected to zero");
  ropekern::SoftmaxRow r2;
  r2.update_max(1.f);
  r2.l += r2.prob(1.f) + r2.prob(0.f);
  const double want = std::log(std::exp(1.0) + std::exp(0.0));
  expect(std::fabs(r2.lse() - want) < 1e-6, "online LSE", std::fabs(r2.lse() - want), 1e-6);
  float wa = 0.f, wb = 0.f, lse = 0.f;
  ropekern::merge_weights(-INFINITY, -INFINITY, &wa, &wb, &lse);
  expect(wa == 0.f && wb == 0.f && lse == -INFINITY, "merging two empty partials");
  ropekern::merge_weights(0.f, 0.f, &wa, &wb, &lse);
  expect(wa == 0.5f && wb == 0.5f && std::fabs(lse - std::log(2.0)) < 1e-6, "merging equal partials");
}

}  // namespace

int main() {
  test_angles();
  test_identity_and_pairs();
  test_softmax();
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("all header tests passed\n");
  return 0;
}
