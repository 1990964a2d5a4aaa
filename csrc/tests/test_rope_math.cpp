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

// Same split as ropekern/scaling.py: split_turns (12 + 12 bits + fp32 remainder).
double round_bits(double x, int bits) {
  int e = 0;
  const double m = std::frexp(x, &e);
  return std::ldexp(std::nearbyint(std::ldexp(m, bits)), e - bits);
}

void split(double inv_freq, float out[3]) {
  const double f = inv_freq / (2.0 * M_PI);
  const double f1 = round_bits(f, 12);
  const double r = f - f1;
  const double f2 = round_bits(r, 12);
  out[0] = static_cast<float>(f1);
  out[1] = static_cast<float>(f2);
  out[2] = static_cast<float>(r - f2);
}

void test_angles() {
  std::mt19937_64 rng(1234);
  std::uniform_int_distribution<int32_t> pos_dist(0, (1 << 24) - 1);
  std::uniform_real_distribution<double> log_freq(-14.0, 0.0);
  double worst = 0.0, worst_plain = 0.0;
  for (int trial = 0; trial < 200000; ++trial) {
    const int32_t pos = trial < 16 ? (1 << 24) - 1 - trial : pos_dist(rng);
    const double inv = trial % 7 == 0 ? 1.0 : std::exp(log_freq(rng));
    float sp[3];
    split(inv, sp);
    float table[3] = {sp[0], sp[1], sp[2]};  // half = 1
    float c = 0.f, s = 0.f;
    ropekern::rope_cos_sin(pos, table, 1, 0, 1.0f, &c, &s);
    const double exact = static_cast<double>(pos) * inv;
    worst = std::fmax(worst, std::fmax(std::fabs(c - std::cos(exact)), std::fabs(s - std::sin(exact))));
    const float plain = static_cast<float>(pos) * static_cast<float>(inv);
    worst_plain = std::fmax(worst_plain, std::fabs(std::cos(plain) - std::cos(exact)));
  }
  std::printf("accurate angles: max |cos/sin error| %.3g (plain fp32 product: %.3g)\n", worst, worst_plain);
  expect(worst <= 2e-6, "cos/sin error vs fp64 for positions < 2^24", worst, 2e-6);
  expect(worst_plain > 1e-2, "plain fp32 baseline is visibly worse (sanity of the test)", worst_plain, 1e-2);
}

void test_identity_and_pairs() {
  float table[3] = {0.1f, 0.f, 0.f};
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
