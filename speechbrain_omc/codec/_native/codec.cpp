// Native CPU kernels of the speechbrain-omc codec.
//
// Every kernel makes one pass over its values (the SGD step two: update, then
// encode; the Adam step checks the gradient first when it updates float32
// state in place), writes straight into its output and runs on OpenMP threads in
// chunks of whole octets, so results do not depend on the thread count. The
// arithmetic mirrors the torch reference in formats.py operation by operation
// (compile with -ffp-contract=off: no fused multiply-add unless written), so
// codes and values are identical bit for bit. A C ABI, loaded with ctypes:
// no torch headers, a compile of a second or two.
//
// Formats: kind 0 = float (sign | exponent | mantissa, no inf/NaN codes,
// saturating), kind 1 = symmetric int in offset binary, kind 2 = float32
// itself (lossless: 32-bit codes are the float bits, so encoding and decoding
// are copies). Codes live either bit-packed (LSB first, value i at stream bits
// [i*bits, (i+1)*bits)) or, with packed == 0, as one int32 per value; for
// 32-bit codes both layouts are the same bytes.
//
// Stochastic rounding draws 31 random bits per value from a counter-based
// hash of a 64-bit key and the value's index (see random31), so the draws are
// reproducible, independent of chunking and threads, and need no buffer.

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI__)
#include <immintrin.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int64_t kChunk = 1 << 15;  // values per thread work item (octets)
constexpr int kTile = 512;           // values per inner tile (stack buffers)
constexpr int kAdamTile = 8192;      // Adam's tile: its five arrays stay in L2

inline uint32_t as_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// A 32-bit integer hash with full avalanche (two xorshift-multiply rounds).
// Both multipliers are below 2**31, so the torch reference can compute the
// same products exactly in int64.
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21f0aaadu;
  x ^= x >> 15;
  x *= 0x735a2d97u;
  x ^= x >> 15;
  return x;
}

// 31 random bits for the element whose 64-bit index has words (lo, hi).
inline uint32_t random31(uint32_t lo, uint32_t hi, uint32_t k0, uint32_t k1) {
  return mix32(mix32(lo ^ k0) ^ k1 ^ hi) >> 1;
}

struct Format {
  int kind, bits, ebits, mbits;
};

// ---------------------------------------------------------------- packing
// Reads count codes starting at value `start` (a multiple of 8).
void read_codes(const uint8_t* src, int64_t nbytes, int packed, int bits,
                int64_t start, int count, uint32_t* codes) {
  if (!packed || bits == 32) {
    std::memcpy(codes, reinterpret_cast<const uint32_t*>(src) + start,
                sizeof(uint32_t) * count);
    return;
  }
  if (bits == 8) {
    const uint8_t* p = src + start;
    for (int j = 0; j < count; ++j) codes[j] = p[j];
    return;
  }
  if (bits == 16) {
    const uint8_t* p = src + 2 * start;
    for (int j = 0; j < count; ++j) {
      uint16_t v;
      std::memcpy(&v, p + 2 * j, 2);
      codes[j] = v;
    }
    return;
  }
  const uint32_t mask = (1u << bits) - 1u;
  const uint8_t* base = src + start * bits / 8;  // start is octet aligned
  const int64_t avail = nbytes - start * bits / 8;
  // A 4-byte window per value holds it (bits + 7 <= 23); near the end of
  // the buffer the window is assembled byte by byte.
  int safe = count;
  while (safe > 0 && (static_cast<int64_t>(safe - 1) * bits / 8) + 4 > avail)
    --safe;
  for (int j = 0; j < safe; ++j) {
    const int64_t bit = static_cast<int64_t>(j) * bits;
    uint32_t w;
    std::memcpy(&w, base + (bit >> 3), 4);
    codes[j] = (w >> (bit & 7)) & mask;
  }
  for (int j = safe; j < count; ++j) {
    const int64_t bit = static_cast<int64_t>(j) * bits;
    const int64_t at = bit >> 3;
    uint32_t w = 0;
    for (int64_t k = 0; k < 4 && at + k < avail; ++k)
      w |= static_cast<uint32_t>(base[at + k]) << (8 * k);
    codes[j] = (w >> (bit & 7)) & mask;
  }
}

// Writes count codes starting at value `start` (a multiple of 8); the bytes
// of the last, partial octet of the tensor are written whole, zero padded.
void write_codes(uint8_t* dst, int64_t nbytes, int packed, int bits,
                 int64_t start, int count, const uint32_t* codes) {
  if (!packed || bits == 32) {
    std::memcpy(reinterpret_cast<uint32_t*>(dst) + start, codes,
                sizeof(uint32_t) * count);
    return;
  }
  if (bits == 8) {
    uint8_t* p = dst + start;
    for (int j = 0; j < count; ++j) p[j] = static_cast<uint8_t>(codes[j]);
    return;
  }
  if (bits == 16) {
    uint8_t* p = dst + 2 * start;
    for (int j = 0; j < count; ++j) {
      const uint16_t v = static_cast<uint16_t>(codes[j]);
      std::memcpy(p + 2 * j, &v, 2);
    }
    return;
  }
  uint8_t* base = dst + start * bits / 8;
  const int64_t avail = nbytes - start * bits / 8;
  for (int o = 0; o < count; o += 8) {
    unsigned __int128 acc = 0;
    const int m = std::min(8, count - o);
    for (int k = 0; k < m; ++k)
      acc |= static_cast<unsigned __int128>(codes[o + k]) << (k * bits);
    const int64_t at = static_cast<int64_t>(o / 8) * bits;
    const int64_t len = std::min<int64_t>(bits, avail - at);
    std::memcpy(base + at, &acc, len);  // little-endian host
  }
}

// ------------------------------------------------------------ quantizers
struct Quantizer {
  Format f;
  int stochastic;
  uint32_t k0, k1;
  // float formats
  int drop, frac, bias, rebias, dexp;
  float min_normal, max_value, d_add, sub_mul1, sub_mul2;
  // int formats
  float top, int_mul;

  Quantizer(Format fmt, int stoch, uint64_t key)
      : f(fmt), stochastic(stoch), k0(static_cast<uint32_t>(key)),
        k1(static_cast<uint32_t>(key >> 32)) {
    if (f.kind == 0) {
      const int e = f.ebits, m = f.mbits;
      bias = (1 << (e - 1)) - 1;
      drop = 23 - m;
      rebias = (127 - bias) << m;
      min_normal = std::ldexp(1.0f, 1 - bias);
      const int top_field = e < 8 ? (1 << e) - 1 : 254;
      max_value = static_cast<float>(std::ldexp(2.0 - std::ldexp(1.0, -m),
                                                top_field - bias));
      dexp = 24 - bias - m;
      d_add = std::ldexp(1.0f, dexp);
      frac = std::min(24, 30 - m);
      // Keep each factor a finite float32, as the reference does.
      if (bias - 1 + m + frac > 127) {
        sub_mul1 = std::ldexp(1.0f, bias - 1);
        sub_mul2 = std::ldexp(1.0f, m + frac);
      } else {
        sub_mul1 = std::ldexp(1.0f, bias - 1 + m + frac);
        sub_mul2 = 1.0f;
      }
    } else if (f.kind == 1) {
      top = static_cast<float>((1 << (f.bits - 1)) - 1);
      frac = 31 - f.bits;
      int_mul = std::ldexp(1.0f, frac);
    }
  }

  // The first j in [0, count) whose index first + j carries into the high
  // 32 bits, or count: the stochastic loops run in (at most) two parts, the
  // high word constant in each, which spares them a carry per value.
  static int carry_at(uint64_t first, int count) {
    const uint32_t left = 0u - static_cast<uint32_t>(first);  // 0: 2**32
    return left != 0 && left < static_cast<uint32_t>(count) ? static_cast<int>(left)
                                                             : count;
  }

  // Codes of tile values y[0..count), element indices first..first+count.
  void operator()(const float* y, int count, uint64_t first,
                  uint32_t* codes) const {
    run([y](int j) { return y[j]; }, count, first, codes);
  }

  // Codes of the values load(0), ..., load(count - 1), element indices
  // first..first+count, stored as Code: computing each value inside the loop
  // fuses a caller's transform into it, and 8- and 16-bit codes stored as
  // such are their packed bytes.
  template <class Load, class Code>
  void run(Load load, int count, uint64_t first, Code* codes) const {
    // 32-bit words of the index (the loops stay in 32-bit lanes): the low
    // one counts from lo0, the high one from hi0 (see carry_at).
    const uint32_t lo0 = static_cast<uint32_t>(first);
    const uint32_t hi0 = static_cast<uint32_t>(first >> 32);
    if (f.kind == 2) {  // every float32 is a code: nothing rounds
      for (int j = 0; j < count; ++j) codes[j] = static_cast<Code>(as_bits(load(j)));
      return;
    }
    if (f.kind == 0) {
      const int m = f.mbits, bits = f.bits;
      const uint32_t sign_bit = 1u << (bits - 1);
      if (stochastic) {
        const uint32_t drop_mask = (1u << drop) - 1u;
        const uint32_t frac_mask = (1u << frac) - 1u;
        const int32_t off = rebias + (1 << m);
        const int drop_ = drop, frac_ = frac;
        const float mn = min_normal, mx = max_value, mul1 = sub_mul1,
                    mul2 = sub_mul2;
        const uint32_t k0_ = k0, k1_ = k1;
        uint32_t hi = hi0;
        for (int j0 = 0, j1 = carry_at(first, count); j0 < count; j0 = j1, j1 = count, ++hi)
          for (int j = j0; j < j1; ++j) {
            const float x = load(j);
            float ax = std::fabs(x);
            float small = std::min(ax, mn);
            ax = std::min(std::max(ax, mn), mx);
            const uint32_t rnd = random31(lo0 + j, hi, k0_, k1_);
            int32_t mag = static_cast<int32_t>(((rnd & drop_mask) + as_bits(ax)) >> drop_);
            small = small * mul1 * mul2;  // mul2 is 1 unless two steps are needed
            int32_t sub = static_cast<int32_t>(small);
            sub = static_cast<int32_t>((static_cast<uint32_t>(sub) + (rnd & frac_mask)) >> frac_);
            mag += sub - off;
            codes[j] = static_cast<Code>(static_cast<uint32_t>(mag) | ((as_bits(x) >> 31) ? sign_bit : 0u));
          }
      } else {
        const uint32_t half = (1u << (drop - 1)) - 1u;
        const int32_t off = rebias + ((127 + dexp) << 23) + (1 << m);
        // Members copied to locals: the codes' stores could alias them,
        // which leaves the loop scalar.
        const int drop_ = drop;
        const float mn = min_normal, mx = max_value, add = d_add;
        for (int j = 0; j < count; ++j) {
          const float x = load(j);
          float ax = std::fabs(x);
          float small = std::min(ax, mn);
          ax = std::min(std::max(ax, mn), mx);
          const uint32_t a = as_bits(ax);
          int32_t mag = static_cast<int32_t>((((a >> drop_) & 1u) + a + half) >> drop_);
          small = small + add;
          mag += static_cast<int32_t>(as_bits(small)) - off;
          codes[j] = static_cast<Code>(static_cast<uint32_t>(mag) | ((as_bits(x) >> 31) ? sign_bit : 0u));
        }
      }
    } else {
      const int32_t zero = 1 << (f.bits - 1);
      const float top_ = top;  // locals, as above
      if (stochastic) {
        const uint32_t frac_mask = (1u << frac) - 1u;
        const int frac_ = frac;
        const float mul = int_mul;
        const uint32_t k0_ = k0, k1_ = k1;
        uint32_t hi = hi0;
        for (int j0 = 0, j1 = carry_at(first, count); j0 < count; j0 = j1, j1 = count, ++hi)
          for (int j = j0; j < j1; ++j) {
            const float x = load(j);
            const float ay = std::min(std::fabs(x), top_) * mul;
            const uint32_t rnd = random31(lo0 + j, hi, k0_, k1_);
            int32_t c = static_cast<int32_t>(
                (static_cast<uint32_t>(static_cast<int32_t>(ay)) + (rnd & frac_mask)) >> frac_);
            const int32_t s = static_cast<int32_t>(as_bits(x)) >> 31;  // 0 or -1
            c = (c ^ s) - s;
            codes[j] = static_cast<Code>(c + zero);
          }
      } else {
        for (int j = 0; j < count; ++j) {
          const float v = std::nearbyint(std::min(std::max(load(j), -top_), top_));
          codes[j] = static_cast<Code>(static_cast<int32_t>(v) + zero);
        }
      }
    }
  }
};

// Decoded value of each code, then the transform's multipliers and shift.
// Float codes are rebiased into float32's exponent directly and subnormal
// codes converted from their mantissa, so that no float32 subnormal ever
// enters arithmetic (on many CPUs each costs a microcode assist); the value
// equals the reference's (raw bits times 2**(127 - bias)) exactly.
struct Decoder {
  Format f;
  float mul1, mul2, shift;
  int flags;  // 1: mul1, 2: mul2, 4: shift
  int top, up, m;
  uint32_t mag_mask, mant_mask, rebias;
  float sub_unit;

  Decoder(Format fmt, float m1, float m2, float sh, int fl)
      : f(fmt), mul1(m1), mul2(m2), shift(sh), flags(fl), top(fmt.bits - 1),
        up(23 - fmt.mbits), m(fmt.mbits), mag_mask((1u << top) - 1u),
        mant_mask((1u << fmt.mbits) - 1u) {
    const int bias = fmt.kind == 0 ? (1 << (fmt.ebits - 1)) - 1 : 0;
    // E8: float32's own exponent; its subnormal codes are float32's.
    rebias = fmt.kind == 0 && fmt.ebits < 8 ? static_cast<uint32_t>(127 - bias) << 23 : 0u;
    sub_unit = std::ldexp(1.0f, 1 - bias - fmt.mbits);
  }

  // The exact value of a float code. Both candidates are computed and one
  // selected, so that loops of it vectorise; the subnormal one multiplies by
  // one for E8 formats, whose unit is itself a float32 subnormal.
  float value(uint32_t c) const {
    const uint32_t sign = (c >> top) << 31, mag = c & mag_mask;
    const float unit = rebias != 0 ? sub_unit : 1.0f;
    const uint32_t sub = as_bits(static_cast<float>(mag & mant_mask) * unit);
    const uint32_t subnormal = 0u - ((rebias != 0) & ((mag >> m) == 0));  // all ones
    return as_float(sign | (sub & subnormal) | (((mag << up) + rebias) & ~subnormal));
  }

  // The transform's multipliers and shift on out[0..count), per flags.
  void affine(int count, float* out) const {
    if (flags & 1)
      for (int j = 0; j < count; ++j) out[j] = out[j] * mul1;
    if (flags & 2)
      for (int j = 0; j < count; ++j) out[j] = out[j] * mul2;
    if (flags & 4)
      for (int j = 0; j < count; ++j) out[j] = out[j] + shift;
  }

  void operator()(const uint32_t* codes, int count, float* out) const {
    if (f.kind == 2) {
      std::memcpy(out, codes, sizeof(float) * count);
    } else if (f.kind == 0) {
      const Decoder d = *this;  // a local copy: stores to out cannot alias it
      for (int j = 0; j < count; ++j) out[j] = d.value(codes[j]);
    } else {
      const int32_t zero = 1 << (f.bits - 1);
      for (int j = 0; j < count; ++j)
        out[j] = static_cast<float>(static_cast<int32_t>(codes[j]) - zero);
    }
    affine(count, out);
  }
};

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI__)
#define OMC_AVX512 1
// Sixteen codes of `bits` bits fill exactly 2 * bits bytes, so groups of
// sixteen start on byte boundaries and can be moved with byte permutations.
struct Group16 {
  __m512i window, right, mask;  // unpacking
  __m512i s1, next, s2, even, pair, s3, s4, compact;  // packing
  int bits;

  explicit Group16(int b) : bits(b) {
    alignas(64) uint8_t idx[64], cmp[64];
    alignas(64) uint32_t sh[16];
    for (int j = 0; j < 16; ++j) {
      const int bit = j * b;
      for (int k = 0; k < 4; ++k)
        idx[4 * j + k] = static_cast<uint8_t>(std::min(63, (bit >> 3) + k));
      sh[j] = bit & 7;
    }
    for (int i = 0; i < 64; ++i)
      cmp[i] = static_cast<uint8_t>(i < b ? i : std::min(63, 16 + i - b));
    window = _mm512_load_si512(idx);
    right = _mm512_load_si512(sh);
    mask = _mm512_set1_epi32(static_cast<int>(b >= 32 ? ~0u : (1u << b) - 1u));
    s1 = _mm512_set1_epi64(b);
    next = _mm512_set_epi64(7, 7, 5, 5, 3, 3, 1, 1);
    s2 = _mm512_set_epi64(64, 2 * b, 64, 2 * b, 64, 2 * b, 64, 2 * b);
    even = _mm512_set_epi64(0, 0, 0, 0, 0, 4, 0, 0);
    pair = _mm512_set_epi64(6, 6, 6, 6, 6, 6, 2, 2);
    s3 = _mm512_set_epi64(64, 64, 64, 64, 64, 4 * b, 64, 4 * b);
    s4 = _mm512_set_epi64(64, 64, 64, 64, 64 - 4 * b, 64, 64 - 4 * b, 64);
    compact = _mm512_load_si512(cmp);
  }

  __m512i unpack_full(const uint8_t* p) const {  // 64 bytes readable at p
    const __m512i v = _mm512_permutexvar_epi8(window, _mm512_loadu_si512(p));
    return _mm512_and_si512(_mm512_srlv_epi32(v, right), mask);
  }

  // The sixteen codes of the group at p, of which `avail` bytes exist: each
  // code's 4-byte window is gathered into its lane, shifted and masked.
  __m512i unpack(const uint8_t* p, int64_t avail) const {
    const __mmask64 k = avail >= 64 ? ~0ULL : (1ULL << avail) - 1;
    const __m512i v = _mm512_permutexvar_epi8(window, _mm512_maskz_loadu_epi8(k, p));
    return _mm512_and_si512(_mm512_srlv_epi32(v, right), mask);
  }

  // The 2 * bits bytes of sixteen codes, at the bottom of the register:
  // lanes merge pairwise, 2b then 4b bits per qword, then into two 8b-bit
  // halves, whose bytes one permutation compacts.
  __m512i packed(__m512i c) const {
    const __m512i lo = _mm512_and_si512(c, _mm512_set1_epi64(0xFFFFFFFFLL));
    const __m512i q = _mm512_or_si512(lo, _mm512_sllv_epi64(_mm512_srli_epi64(c, 32), s1));
    const __m512i r = _mm512_or_si512(q, _mm512_sllv_epi64(_mm512_permutexvar_epi64(next, q), s2));
    const __m512i x = _mm512_maskz_permutexvar_epi64(0x05, even, r);
    const __m512i y = _mm512_permutexvar_epi64(pair, r);
    const __m512i o = _mm512_or_si512(
        x, _mm512_or_si512(_mm512_sllv_epi64(y, s3), _mm512_srlv_epi64(y, s4)));
    return _mm512_permutexvar_epi8(compact, o);
  }
};

inline __mmask16 first_lanes(int64_t count) {
  return count >= 16 ? static_cast<__mmask16>(0xFFFF)
                     : static_cast<__mmask16>((1u << count) - 1u);
}

// Decodes values [start, end) (start a multiple of 16) in registers; loads
// and stores are masked only at the very end of the tensor.
void decode_avx512(const uint8_t* src, int64_t nbytes, int packed,
                   const Decoder& dec, int64_t start, int64_t end, float* out) {
  const Group16 g(dec.f.bits);
  const int top = dec.top, up = dec.up;
  const __m512i mag_mask = _mm512_set1_epi32(static_cast<int>(dec.mag_mask));
  const __m512i mant_mask = _mm512_set1_epi32(static_cast<int>(dec.mant_mask));
  const __m512i rebias = _mm512_set1_epi32(static_cast<int>(dec.rebias));
  const __m512 sub_unit = _mm512_set1_ps(dec.sub_unit);
  const __m512i zero = _mm512_set1_epi32(1 << top);
  const __m512 m1 = _mm512_set1_ps(dec.mul1), m2 = _mm512_set1_ps(dec.mul2),
               sh = _mm512_set1_ps(dec.shift);
  const int32_t* src32 = reinterpret_cast<const int32_t*>(src);
  const auto values = [&](__m512i c) {
    __m512 v;
    if (dec.f.kind == 0) {
      const __m512i sign = _mm512_slli_epi32(_mm512_srli_epi32(c, top), 31);
      const __m512i mag = _mm512_and_si512(c, mag_mask);
      __m512i bits = _mm512_add_epi32(_mm512_slli_epi32(mag, up), rebias);
      if (dec.rebias != 0) {  // subnormal codes: mantissa times the unit
        const __mmask16 sub = _mm512_cmplt_epu32_mask(mag, _mm512_set1_epi32(1 << dec.m));
        const __m512 small = _mm512_mul_ps(
            _mm512_cvtepi32_ps(_mm512_and_si512(mag, mant_mask)), sub_unit);
        bits = _mm512_mask_blend_epi32(sub, bits, _mm512_castps_si512(small));
      }
      v = _mm512_castsi512_ps(_mm512_or_si512(sign, bits));
    } else {
      v = _mm512_cvtepi32_ps(_mm512_sub_epi32(c, zero));
    }
    if (dec.flags & 1) v = _mm512_mul_ps(v, m1);
    if (dec.flags & 2) v = _mm512_mul_ps(v, m2);
    if (dec.flags & 4) v = _mm512_add_ps(v, sh);
    return v;
  };
  int64_t s = start;
  // Full groups whose 64-byte window lies inside the buffer.
  const int64_t safe = packed ? std::max<int64_t>(0, (nbytes - 64) / (2 * g.bits) * 16)
                              : end;
  const int64_t fast_end = std::min(end - (end - start) % 16, std::max(start, safe));
  for (; s < fast_end; s += 16) {
    const __m512i c = packed ? g.unpack_full(src + s / 8 * g.bits)
                             : _mm512_loadu_si512(src32 + s);
    _mm512_storeu_ps(out + s, values(c));
  }
  for (; s < end; s += 16) {
    const __mmask16 k = first_lanes(end - s);
    const int64_t at = s / 8 * g.bits;
    const __m512i c = packed ? g.unpack(src + at, nbytes - at)
                             : _mm512_maskz_loadu_epi32(k, src32 + s);
    _mm512_mask_storeu_ps(out + s, k, values(c));
  }
}

// Packs count codes (a tile) of values starting at `start` (a multiple of
// 16); bytes from `limit` on belong to another thread or lie past the end.
// Full groups are stored 32 bytes at a time: the bytes past a group's own
// 2 * bits are rewritten by the next group.
void pack_avx512(const Group16& g, const uint32_t* codes, int count, uint8_t* dst,
                 int64_t limit, int64_t start) {
  for (int j = 0; j < count; j += 16) {
    const int64_t at = (start + j) / 8 * g.bits;
    if (j + 16 <= count && at + 32 <= limit) {
      const __m512i c = _mm512_loadu_si512(codes + j);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + at),
                          _mm512_castsi512_si256(g.packed(c)));
    } else {
      const __m512i c = _mm512_maskz_loadu_epi32(first_lanes(count - j), codes + j);
      const int64_t len = std::min<int64_t>(2 * g.bits, limit - at);
      const __mmask64 k = (1ULL << len) - 1;  // len <= 32
      _mm512_mask_storeu_epi8(dst + at, k, g.packed(c));
    }
  }
}
#endif  // AVX-512 VBMI

// y = (x - shift) / scale (kind 2), x / scale (kind 1) or x (kind 0).
inline void forward_transform(const float* x, int count, int tkind, float scale,
                              float shift, float* y) {
  if (tkind == 0) {
    std::memcpy(y, x, sizeof(float) * count);
  } else if (tkind == 1) {
    for (int j = 0; j < count; ++j) y[j] = x[j] / scale;
  } else {
    for (int j = 0; j < count; ++j) y[j] = (x[j] - shift) / scale;
  }
}

inline int threads_for(int64_t n, int nthreads) {
  return n >= 2 * kChunk && nthreads > 1 ? nthreads : 1;
}

// Min, max and the count of non-finite values of x[0..count), vectorised:
// lanes keep partial results; NaN is counted, so comparisons may ignore it.
struct MinMax {
  float lo = INFINITY, hi = -INFINITY;
  int64_t bad = 0;

  void add(const float* x, int64_t count) {
    typedef float v16 __attribute__((vector_size(64)));
    typedef int32_t i16 __attribute__((vector_size(64)));
    v16 vlo, vhi;
    i16 vbad = {};
    for (int k = 0; k < 16; ++k) vlo[k] = INFINITY, vhi[k] = -INFINITY;
    const v16 fmax = {FLT_MAX, FLT_MAX, FLT_MAX, FLT_MAX, FLT_MAX, FLT_MAX,
                      FLT_MAX, FLT_MAX, FLT_MAX, FLT_MAX, FLT_MAX, FLT_MAX,
                      FLT_MAX, FLT_MAX, FLT_MAX, FLT_MAX};
    const v16 vzero = {};
    int64_t j = 0;
    for (; j + 16 <= count; j += 16) {
      v16 v;
      std::memcpy(&v, x + j, sizeof v);
      vlo = v < vlo ? v : vlo;
      vhi = v > vhi ? v : vhi;
      const v16 av = v < vzero ? -v : v;
      vbad -= ~(av <= fmax);  // comparisons give -1 where true
    }
    for (int k = 0; k < 16; ++k) {
      lo = std::min(lo, vlo[k]);
      hi = std::max(hi, vhi[k]);
      bad += vbad[k];
    }
    for (; j < count; ++j) {
      const float v = x[j];
      lo = std::min(lo, v);
      hi = std::max(hi, v);
      bad += !(std::fabs(v) <= FLT_MAX);
    }
  }

  void merge(const MinMax& o) {
    lo = std::min(lo, o.lo);
    hi = std::max(hi, o.hi);
    bad += o.bad;
  }

  // The step kernels' report: {min, max, non-finite count}.
  void write(float* lo_hi) const {
    lo_hi[0] = lo;
    lo_hi[1] = hi;
    lo_hi[2] = static_cast<float>(bad);
  }
};

// Decodes values [start, end) (start a multiple of 16) into out.
void decode_range(const uint8_t* src, int64_t nbytes, int packed,
                  const Decoder& dec, int64_t start, int64_t end, float* out) {
  if (dec.f.kind == 2) {  // the bytes are the values, in either layout
    std::memcpy(out + start, src + 4 * start, sizeof(float) * (end - start));
    dec.affine(static_cast<int>(end - start), out + start);
    return;
  }
#ifdef OMC_AVX512
  decode_avx512(src, nbytes, packed, dec, start, end, out);
#else
  uint32_t codes[kTile];
  for (int64_t s = start; s < end; s += kTile) {
    const int count = static_cast<int>(std::min<int64_t>(kTile, end - s));
    read_codes(src, nbytes, packed, dec.f.bits, s, count, codes);
    dec(codes, count, out + s);
  }
#endif
}

}  // namespace

extern "C" {

// Version of this ABI; the loader refuses a library that disagrees.
int omc_abi_version() { return 4; }

int omc_max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// out[0..n) = decode(codes) * mul1 * mul2 + shift (each step per flags).
void omc_decode(const uint8_t* src, int64_t nbytes, int packed, float* out,
                int64_t n, int kind, int bits, int ebits, int mbits, float mul1,
                float mul2, float shift, int flags, int nthreads) {
  const Decoder dec({kind, bits, ebits, mbits}, mul1, mul2, shift, flags);
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) num_threads(threads_for(n, nthreads))
  for (int64_t c = 0; c < chunks; ++c)
    decode_range(src, nbytes, packed, dec, c * kChunk, std::min(n, (c + 1) * kChunk),
                 out);
}

// codes of transform(x[0..n)) written to dst; element i draws its random
// bits from (key, index_offset + i).
void omc_encode(const float* x, int64_t n, uint8_t* dst, int64_t nbytes,
                int packed, int kind, int bits, int ebits, int mbits, int tkind,
                float scale, float shift, int stochastic, uint64_t key,
                int64_t index_offset, int nthreads) {
  const Quantizer quant({kind, bits, ebits, mbits}, stochastic, key);
#ifdef OMC_AVX512
  const Group16 group(bits);
#endif
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) num_threads(threads_for(n, nthreads))
  for (int64_t c = 0; c < chunks; ++c) {
    uint32_t codes[kTile];
    float y[kTile];
    const int64_t end = std::min(n, (c + 1) * kChunk);
    if (kind == 2 && tkind == 0) {  // lossless: the chunk's bytes are its codes
      std::memcpy(dst + 4 * c * kChunk, x + c * kChunk, sizeof(float) * (end - c * kChunk));
      continue;
    }
    const int64_t limit = std::min(nbytes, end / 8 * bits + (end % 8 ? bits : 0));
    for (int64_t s = c * kChunk; s < end; s += kTile) {
      const int count = static_cast<int>(std::min<int64_t>(kTile, end - s));
      forward_transform(x + s, count, tkind, scale, shift, y);
      quant(y, count, static_cast<uint64_t>(index_offset + s), codes);
#ifdef OMC_AVX512
      if (packed && bits != 8 && bits != 16 && bits != 32) {  // plain stores
        pack_avx512(group, codes, count, dst, limit, s);
        continue;
      }
#endif
      write_codes(dst, nbytes, packed, bits, s, count, codes);
    }
  }
}

// lo_hi[0..1] = min and max of x; returns the number of non-finite values.
int64_t omc_minmax(const float* x, int64_t n, float* lo_hi, int nthreads) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  MinMax total;
#pragma omp parallel num_threads(threads_for(n, nthreads))
  {
    MinMax part;
#pragma omp for schedule(static) nowait
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t end = std::min(n, (c + 1) * kChunk);
      part.add(x + c * kChunk, end - c * kChunk);
    }
#pragma omp critical
    total.merge(part);
  }
  lo_hi[0] = total.lo;
  lo_hi[1] = total.hi;
  return total.bad;
}

// One torch.optim.SGD step (single-tensor path, bit for bit) on the float32
// value w, in place; with codes, w is first decoded from them, chunk by
// chunk, so the decoded value never leaves the cache before its update.
// d = g (+ wd * w); with momentum, buf = g-based d on the
// first step (init_buf) else momentum * buf + (1 - dampening) * d, and d = buf
// (or d + momentum * buf with Nesterov); w += -lr * d. torch's add with alpha
// is one fused multiply-add, hence fmaf. Returns the number of non-finite
// gradient values: then, with momentum, nothing was written; without, w is
// garbage (it is a scratch copy). lo_hi receives w's new min and max and
// lo_hi[2] its non-finite count.
int64_t omc_sgd_step(float* w, const float* g, float* buf, int64_t n,
                     float neg_lr, float momentum, float damp1, float wd,
                     int nesterov, int init_buf, float* lo_hi, int nthreads,
                     const uint8_t* codes, int64_t nbytes, int kind, int bits,
                     int ebits, int mbits, float mul1, float mul2, float shift,
                     int flags) {
  const Decoder dec({kind, bits, ebits, mbits}, mul1, mul2, shift, flags);
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int nt = threads_for(n, nthreads);
  if (buf != nullptr) {  // momentum is state: check before writing it
    float unused[2];
    const int64_t bad = omc_minmax(g, n, unused, nthreads);
    if (bad) return bad;
  }
  MinMax total;
  int64_t bad_grad = 0;
#pragma omp parallel num_threads(nt) reduction(+ : bad_grad)
  {
    MinMax part;
#pragma omp for schedule(static) nowait
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t start = c * kChunk, end = std::min(n, start + kChunk);
      if (codes != nullptr) decode_range(codes, nbytes, 1, dec, start, end, w);
      for (int64_t i = start; i < end; ++i) {
        const float gi = g[i];
        bad_grad += !(std::fabs(gi) <= FLT_MAX);
        float d = wd != 0.0f ? std::fma(w[i], wd, gi) : gi;
        if (buf != nullptr) {
          const float b = init_buf ? d : std::fma(d, damp1, buf[i] * momentum);
          buf[i] = b;
          d = nesterov ? std::fma(b, momentum, d) : b;
        }
        w[i] = std::fma(d, neg_lr, w[i]);
      }
      part.add(w + start, end - start);
    }
#pragma omp critical
    total.merge(part);
  }
  total.write(lo_hi);
  return bad_grad;
}


// ------------------------------------------------------ block-wise codes
// Optimizer state (Adam's moments, SGD momentum) is stored block by block:
// each block of `block` values (a power of two, >= 16) has its own float32
// scale, fitted as the per-variable transform is (absmax / max_value in
// double, rounded to float32, never below float32's smallest normal, 1 for
// an all-zero block). With `sqrt`, a block holds the square roots of
// non-negative values (Adam's second moment), which halves their range.

}  // extern "C"
namespace {

inline float block_scale(float absmax, double max_value) {
  if (!(absmax > 0.0f)) return 1.0f;
  const float s = static_cast<float>(static_cast<double>(absmax) / max_value);
  return s < FLT_MIN ? FLT_MIN : s;
}

inline double format_max(const Format& f) {
  if (f.kind == 1) return static_cast<double>((1 << (f.bits - 1)) - 1);
  const int bias = (1 << (f.ebits - 1)) - 1;
  const int top = f.ebits < 8 ? (1 << f.ebits) - 1 : 254;
  return std::ldexp(2.0 - std::ldexp(1.0, -f.mbits), top - bias);
}

// The largest magnitude of x[0, count), in sixteen lanes (the maximum does
// not depend on the order it is taken in; NaN is passed over throughout).
template <bool kSqrt>
inline float abs_max(const float* x, int count, float* roots) {
  typedef float v16 __attribute__((vector_size(64)));
  typedef uint32_t u16 __attribute__((vector_size(64)));
  v16 lanes = {};
  int j = 0;
  for (; j + 16 <= count; j += 16) {
    v16 v;
    std::memcpy(&v, x + j, sizeof v);
    if (kSqrt) {
      for (int k = 0; k < 16; ++k) v[k] = std::sqrt(v[k]);
      std::memcpy(roots + j, &v, sizeof v);
    }
    v = reinterpret_cast<v16>(reinterpret_cast<u16>(v) & 0x7fffffffu);  // fabs
    lanes = v > lanes ? v : lanes;
  }
  // Halving, not a chain of sixteen: the block's scale waits on this.
  for (int w = 8; w >= 1; w /= 2)
    for (int k = 0; k < w; ++k) lanes[k] = std::max(lanes[k], lanes[k + w]);
  float absmax = lanes[0];
  for (; j < count; ++j) {
    const float v = kSqrt ? (roots[j] = std::sqrt(x[j])) : x[j];
    absmax = std::max(absmax, std::fabs(v));
  }
  return absmax;
}

// One format's block codec, set up once per call rather than per block.
// Each block takes one fused pass per direction where its codes are whole
// bytes: decoding reads the codes and writes the scaled (and squared)
// values; encoding, after the pass that takes the square roots and absmax,
// divides, quantizes and stores the codes in one loop.
struct BlockCodec {
  Format f;
  bool sqrt_values;
  double max_value;  // format_max(f)
  Decoder dec;       // the codes' values, before the block's scale
  Quantizer quant;
#ifdef OMC_AVX512
  Group16 group;
#endif

  BlockCodec(Format fmt, bool sq, int stochastic, uint64_t key)
      : f(fmt), sqrt_values(sq), max_value(fmt.kind == 2 ? 1.0 : format_max(fmt)),
        dec(fmt, 1.0f, 1.0f, 0.0f, 0), quant(fmt, stochastic, key)
#ifdef OMC_AVX512
        , group(fmt.bits)
#endif
  {}

  // out[j] = value(j) * scale, squared with sqrt_values: the Decoder's
  // multiplier, then the square, as decoding and squaring in turn.
  template <class Value>
  void scaled(int count, float scale, float* out, Value value) const {
    if (sqrt_values) {
      for (int j = 0; j < count; ++j) {
        const float v = value(j) * scale;
        out[j] = v * v;
      }
    } else {
      for (int j = 0; j < count; ++j) out[j] = value(j) * scale;
    }
  }

  // The values of codes c[0, count), times scale (squared with sqrt_values).
  template <class Code>
  void values(const Code* c, int count, float scale, float* out) const {
    if (f.kind == 0) {
      const Decoder d = dec;  // a copy: stores to out cannot alias it
      scaled(count, scale, out, [d, c](int j) { return d.value(c[j]); });
    } else if (f.kind == 1) {
      const int32_t zero = 1 << (f.bits - 1);
      scaled(count, scale, out, [zero, c](int j) {
        return static_cast<float>(static_cast<int32_t>(c[j]) - zero);
      });
    } else {  // float32 itself: 32-bit codes
      scaled(count, scale, out, [c](int j) { return as_float(c[j]); });
    }
  }

  // Decodes one block, the count values from index start on, into out;
  // codes is scratch for codes of other widths than 8, 16 and 32 bits.
  void decode(const uint8_t* src, int64_t nbytes, int64_t start, int count,
              float scale, float* out, uint32_t* codes) const {
    if (f.bits == 8) {
      values(src + start, count, scale, out);
    } else if (f.bits == 16) {
      values(reinterpret_cast<const uint16_t*>(src) + start, count, scale, out);
    } else if (f.bits == 32) {
      values(reinterpret_cast<const uint32_t*>(src) + start, count, scale, out);
    } else {
      read_codes(src, nbytes, 1, f.bits, start, count, codes);
      values(codes, count, scale, out);
    }
  }

  // Encodes the blocks of x[0, count), indices start.. (whole blocks of
  // `block` values, but for the tensor's last), into dst and their scales
  // into scales[0..]; tmp (count values) and codes (a block) are scratch.
  // Every scale is found first, so that no block's quantization waits on
  // the reduction and division that make its scale.
  void encode(const float* x, int64_t start, int count, int block, uint8_t* dst,
              int64_t nbytes, float* scales, float* tmp, uint32_t* codes) const {
    const float* y = sqrt_values ? tmp : x;
    for (int b = 0; b < count; b += block) {
      const int c = std::min(block, count - b);
      const float absmax = sqrt_values ? abs_max<true>(x + b, c, tmp + b)
                                       : abs_max<false>(x + b, c, nullptr);
      // A lossless format keeps the values: dividing by 1 is exact.
      scales[b / block] = f.kind == 2 ? 1.0f : block_scale(absmax, max_value);
    }
    for (int b = 0; b < count; b += block)
      quantize(y + b, start + b, std::min(block, count - b), scales[b / block], dst,
               nbytes, codes);
  }

  // Codes of the block y[0, count) / s, indices start.., into dst.
  void quantize(const float* y, int64_t start, int count, float s, uint8_t* dst,
                int64_t nbytes, uint32_t* codes) const {
    const auto load = [y, s](int j) { return y[j] / s; };
    const uint64_t first = static_cast<uint64_t>(start);
    if (f.bits == 8) {
      quant.run(load, count, first, dst + start);
    } else if (f.bits == 16) {
      quant.run(load, count, first, reinterpret_cast<uint16_t*>(dst) + start);
    } else if (f.bits == 32) {
      quant.run(load, count, first, reinterpret_cast<uint32_t*>(dst) + start);
    } else {
      quant.run(load, count, first, codes);
#ifdef OMC_AVX512
      // Only the block's own bytes are written (codes read and written in
      // place stay intact), the last partial octet of the tensor whole.
      const int64_t limit = std::min(nbytes, (start + count + 7) / 8 * f.bits);
      pack_avx512(group, codes, count, dst, limit, start);
#else
      write_codes(dst, nbytes, 1, f.bits, start, count, codes);
#endif
    }
  }
};

inline int64_t block_chunk(int64_t block) { return std::max<int64_t>(block, kChunk); }

}  // namespace
extern "C" {

// Block-wise encoding of x[0, n) (n a multiple of nothing: the last block
// may be short); scales[ceil(n / block)].
void omc_encode_blocks(const float* x, int64_t n, int64_t block, int sqrt_values,
                       uint8_t* dst, int64_t nbytes, float* scales, int kind,
                       int bits, int ebits, int mbits, int stochastic,
                       uint64_t key, int nthreads) {
  const BlockCodec codec({kind, bits, ebits, mbits}, sqrt_values != 0, stochastic, key);
  const int64_t step = block_chunk(block);
  const int64_t chunks = (n + step - 1) / step;
  // Tiles of whole blocks, as Adam's: BlockCodec::encode finds a tile's
  // scales before it quantizes.
  const int tile = static_cast<int>(std::max<int64_t>(block, kAdamTile));
#pragma omp parallel num_threads(threads_for(n, nthreads))
  {
    std::unique_ptr<float[]> tmp(new float[tile]);  // uninitialised scratch
    std::unique_ptr<uint32_t[]> codes(new uint32_t[block]);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t end = std::min(n, (c + 1) * step);
      for (int64_t s = c * step; s < end; s += tile) {
        const int count = static_cast<int>(std::min<int64_t>(tile, end - s));
        codec.encode(x + s, s, count, static_cast<int>(block), dst, nbytes,
                     scales + s / block, tmp.get(), codes.get());
      }
    }
  }
}

void omc_decode_blocks(const uint8_t* src, int64_t nbytes, int64_t n,
                       int64_t block, int sqrt_values, const float* scales,
                       float* out, int kind, int bits, int ebits, int mbits,
                       int nthreads) {
  const BlockCodec codec({kind, bits, ebits, mbits}, sqrt_values != 0, 0, 0);
  const int64_t step = block_chunk(block);
  const int64_t chunks = (n + step - 1) / step;
#pragma omp parallel num_threads(threads_for(n, nthreads))
  {
    std::unique_ptr<uint32_t[]> codes(new uint32_t[block]);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t end = std::min(n, (c + 1) * step);
      for (int64_t s = c * step; s < end; s += block) {
        const int count = static_cast<int>(std::min<int64_t>(block, end - s));
        codec.decode(src, nbytes, s, count, scales[s / block], out + s, codes.get());
      }
    }
  }
}

// ------------------------------------------------------------------- Adam
// One torch.optim.Adam(W) step of one parameter in one pass: the weight is
// decoded from its codes chunk by chunk, Adam's moments are read from
// float32 or block-wise codes, the update follows torch's single-tensor
// path (torch/optim/adam.py, _single_tensor_adam: not capturable, no
// amsgrad, no maximize) operation by operation, and the new moments are
// written back, float32 or encoded block by block. The weight stays in w
// (float32) for the caller to encode. Chunks are whole blocks, so nothing
// depends on the thread count.

}  // extern "C"
namespace {

// Where one moment comes from and goes to. A source is float32 values
// (in_values), block-wise codes (in_codes) or, with neither, zeros; the
// target is float32 values (out_values, possibly in_values itself) or
// block-wise codes (out_codes), which share the source's block size.
struct MomentArgs {
  const float* in_values;
  const uint8_t* in_codes;
  const float* in_scales;
  int64_t in_nbytes;
  int32_t in_format[4];  // kind, bits, exponent bits, mantissa bits
  int32_t in_sqrt;       // the codes hold square roots
  float* out_values;
  uint8_t* out_codes;
  float* out_scales;
  int64_t out_nbytes;
  int32_t out_format[4];
  int32_t out_sqrt;
  int32_t stochastic;    // stochastic rounding of out_codes, keyed by key
  uint64_t key;
};

// The step's scalars, each a Python double of torch's step cast to float32
// as ATen casts a scalar argument (see kernels.adam_step).
struct AdamArgs {
  float decay;         // AdamW: w *= 1 - lr * wd
  float weight_decay;  // Adam: g = g + wd * w
  float lerp_weight;   // 1 - beta1
  float beta2;
  float one_minus_beta2;
  float bias2_sqrt;    // (1 - beta2 ** step) ** 0.5
  float eps;
  float neg_step;      // -lr / (1 - beta1 ** step)
  int32_t decoupled;   // weight decay as AdamW's (with weight_decay != 0)
  int32_t has_decay;   // weight_decay != 0
};

// torch.sqrt's own elementwise routine (MKL's vmsSqrt in MKL builds of
// torch), so that the denominator has torch's bits even where it is not
// correctly rounded; nullptr: std::sqrt, correctly rounded.
typedef void (*SqrtFn)(int32_t, const float*, float*, int64_t);

// A moment's codecs, to read (in) and write (out) its codes; float32 itself
// stands in for a side that holds no codes.
struct MomentCodecs {
  BlockCodec in, out;

  static Format format(const int32_t* f, const void* codes) {
    return codes != nullptr ? Format{f[0], f[1], f[2], f[3]} : Format{2, 32, 8, 23};
  }

  explicit MomentCodecs(const MomentArgs& a)
      : in(format(a.in_format, a.in_codes), a.in_sqrt != 0, 0, 0),
        out(format(a.out_format, a.out_codes), a.out_sqrt != 0, a.stochastic, a.key) {}
};

// The count values of a moment from index start on, to update in place:
// float32 state updated in place is its own tile; otherwise the source is
// read into buf.
float* load_moment(const MomentArgs& a, const BlockCodec& codec, int64_t block,
                   int64_t start, int count, float* buf, uint32_t* codes) {
  if (a.in_values != nullptr && a.in_values == a.out_values)
    return a.out_values + start;
  if (a.in_codes != nullptr) {
    for (int b = 0; b < count; b += static_cast<int>(block)) {
      const int c = static_cast<int>(std::min<int64_t>(block, count - b));
      codec.decode(a.in_codes, a.in_nbytes, start + b, c,
                   a.in_scales[(start + b) / block], buf + b, codes);
    }
  } else if (a.in_values != nullptr) {
    std::memcpy(buf, a.in_values + start, sizeof(float) * count);
  } else {
    std::fill(buf, buf + count, 0.0f);
  }
  return buf;
}

// Writes the updated tile x of a moment (count values from index start on)
// to its target, unless it is the target itself.
void store_moment(const MomentArgs& a, const BlockCodec& codec, int64_t block,
                  int64_t start, int count, const float* x, float* tmp,
                  uint32_t* codes) {
  if (a.out_codes != nullptr) {
    codec.encode(x, start, count, static_cast<int>(block), a.out_codes, a.out_nbytes,
                 a.out_scales + start / block, tmp, codes);
  } else if (x != a.out_values + start) {
    std::memcpy(a.out_values + start, x, sizeof(float) * count);
  }
}

// The first part of the update of count values, in one loop: the weight
// decay and both moments. w (the weight), m and v (the moments) in place, g
// the gradient. Every line is one ATen operation of torch's single-tensor
// Adam, in its order and its rounding (compiled with -ffp-contract=off: a
// fused multiply-add only where written, which is where ATen's vectorised
// CPU kernels use one; their scalar tails agree).
template <bool kCoupled, bool kSmallWeight>
void adam_moments(const AdamArgs& p, int count, float* w, const float* g, float* m,
                  float* v) {
  // AdamW's param.mul_(1 - lr * weight_decay); times one (exact) otherwise.
  const float decay = p.has_decay && p.decoupled ? p.decay : 1.0f;
  const float wd = p.weight_decay, t = p.lerp_weight, t1 = p.lerp_weight - 1.0f;
  const float beta2 = p.beta2, one_minus_beta2 = p.one_minus_beta2;
  for (int j = 0; j < count; ++j) {
    // Adam's grad = grad.add(param, alpha=weight_decay): one fma.
    const float gj = kCoupled ? std::fma(w[j], wd, g[j]) : g[j];
    w[j] = w[j] * decay;
    // exp_avg.lerp_(grad, 1 - beta1): ATen's lerp is self + t * (end - self)
    // for a weight t below one half, else end - (end - self) * (1 - t), each
    // one fma with (end - self) rounded first.
    const float d = gj - m[j];
    m[j] = kSmallWeight ? std::fma(t, d, m[j]) : std::fma(t1, d, gj);
    // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2): the
    // product is rounded, then addcmul is (value * g) * g + self, one fma.
    v[j] = std::fma(one_minus_beta2 * gj, gj, v[j] * beta2);
  }
}

// One Adam step of count values: w (the weight), m and v (the moments) in
// place, g the gradient; den is scratch.
void adam_update(const AdamArgs& p, SqrtFn vsqrt, int64_t sqrt_mode, int count,
                 float* w, const float* g, float* m, float* v, float* den) {
  const bool coupled = p.has_decay && !p.decoupled;
  const bool small = std::fabs(p.lerp_weight) < 0.5f;  // as ATen's lerp decides
  if (coupled && small) adam_moments<true, true>(p, count, w, g, m, v);
  if (coupled && !small) adam_moments<true, false>(p, count, w, g, m, v);
  if (!coupled && small) adam_moments<false, true>(p, count, w, g, m, v);
  if (!coupled && !small) adam_moments<false, false>(p, count, w, g, m, v);
  // denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps), with
  // torch.sqrt's own routine where it is not correctly rounded.
  if (vsqrt != nullptr) {
    vsqrt(count, v, den, sqrt_mode);
  } else {
    for (int j = 0; j < count; ++j) den[j] = std::sqrt(v[j]);
  }
  // param.addcdiv_(exp_avg, denom, value=-step_size): self + value * t1 / t2,
  // left to right.
  const float bias2_sqrt = p.bias2_sqrt, eps = p.eps, neg_step = p.neg_step;
  for (int j = 0; j < count; ++j)
    w[j] = w[j] + neg_step * m[j] / (den[j] / bias2_sqrt + eps);
}

}  // namespace
extern "C" {

// One Adam(W) step of the n values of w; with codes (a packed weight, format
// and transform as omc_decode's), w is first decoded from them. exp_avg and
// exp_avg_sq say where each moment is read and written (MomentArgs), with
// one scale per `block` values when block-wise. Returns the number of
// non-finite gradient values; when it is not zero, no float32 target was
// written (they are checked first) and the codes written mean nothing.
// lo_hi receives the new weight's min, max and non-finite count.
int64_t omc_adam_step(float* w, const float* g, int64_t n, const AdamArgs* hp,
                      const MomentArgs* exp_avg, const MomentArgs* exp_avg_sq,
                      int64_t block, SqrtFn vsqrt, int64_t sqrt_mode,
                      float* lo_hi, int nthreads, const uint8_t* codes,
                      int64_t nbytes, int kind, int bits, int ebits, int mbits,
                      float mul1, float mul2, float shift, int flags) {
  const bool in_place = exp_avg->out_values != nullptr || exp_avg_sq->out_values != nullptr;
  if (in_place) {  // float32 state: nothing is written for a bad gradient
    float unused[2];
    const int64_t bad = omc_minmax(g, n, unused, nthreads);
    if (bad) return bad;
  }
  const Decoder dec({kind, bits, ebits, mbits}, mul1, mul2, shift, flags);
  const MomentCodecs c1(*exp_avg), c2(*exp_avg_sq);
  const AdamArgs p = *hp;
  const int64_t step = block_chunk(block);
  const int tile = static_cast<int>(std::max<int64_t>(block, kAdamTile));  // whole blocks
  const int64_t chunks = (n + step - 1) / step;
  MinMax total;
  int64_t bad_grad = 0;
#pragma omp parallel num_threads(threads_for(n, nthreads)) reduction(+ : bad_grad)
  {
    // Uninitialised scratch (a vector's zeros cost a pass for small tensors).
    std::unique_ptr<float[]> m(new float[tile]), v(new float[tile]),
        den(new float[tile]), tmp(new float[tile]);
    std::unique_ptr<uint32_t[]> code_tmp(new uint32_t[block]);
    MinMax part;
#pragma omp for schedule(static) nowait
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t start = c * step, end = std::min(n, start + step);
      if (codes != nullptr) decode_range(codes, nbytes, 1, dec, start, end, w);
      for (int64_t s = start; s < end; s += tile) {
        const int count = static_cast<int>(std::min<int64_t>(tile, end - s));
        if (!in_place) {
          MinMax gm;
          gm.add(g + s, count);
          bad_grad += gm.bad;
        }
        float* mt = load_moment(*exp_avg, c1.in, block, s, count, m.get(), code_tmp.get());
        float* vt = load_moment(*exp_avg_sq, c2.in, block, s, count, v.get(), code_tmp.get());
        adam_update(p, vsqrt, sqrt_mode, count, w + s, g + s, mt, vt, den.get());
        store_moment(*exp_avg, c1.out, block, s, count, mt, tmp.get(), code_tmp.get());
        store_moment(*exp_avg_sq, c2.out, block, s, count, vt, tmp.get(), code_tmp.get());
      }
      part.add(w + start, end - start);
    }
#pragma omp critical
    total.merge(part);
  }
  total.write(lo_hi);
  return bad_grad;
}

}  // extern "C"
