// Offline restructuring of codes and scales into the packed (GPU) layout, and back.
//
// The packed layout depends only on (N, K, bits, group size): never on a tile configuration, the
// GPU model or its SM count. See docs/format.md for the diagram. Summary:
//   * W is cut into blocks of 16 rows x 128 columns (N padded to 16, K to 128 with code 0); blocks
//     are stored row-block-major: block (nb, kb) at index nb * (K_pad / 128) + kb, 256 * bits bytes each.
//   * Inside a block, lane l = 4 * g + t (g = l / 4, t = l % 4) of a warp owns, for each of the 8
//     16-wide k-steps ks = 2 j + h, four pairs of codes p = 0..3:
//         row  = g + 8 * (p & 1)
//         cols = 32 j + 8 t + 4 h + 2 * (p >> 1) + {0, 1}
//     which are exactly the A-operand registers a0..a3 of mma.m16n8k16 (rows = N, the k order inside
//     a 32-column chunk is permuted so that each lane's activations are 8 consecutive values).
//   * Each pair (q0, q1) becomes one pair code that indexes a 2^(2 bits) table of value pairs.
//     4 bits: byte  [ks / 4][lane][ks % 4][p]          code q0 | q1 << 4       (32 B per lane)
//     2 bits: nibble [lane][ks / 2][(ks % 2) * 4 + p]    code q0 | q1 << 2       (16 B per lane)
//     3 bits: the low 2 bits of each code in the 2-bit layout (16 B per lane), then the high bits,
//             2 bits per pair, [lane][ks / 4][(ks % 4) * 4 + p] (8 B per lane).
//   * Scales: fp16, [N_pad / 16][G][8][2]: for each row block and group, rows (r, r + 8) side by side.
// Slicing for tensor parallelism: rows at multiples of 16 and columns at multiples of 128 (and of g)
// select whole blocks and whole scale groups; see slice_packed().
#pragma once
#include <cstdint>
#include <vector>

#include "lutmm/format.h"

namespace lutmm {

// Packs N x K codes (one byte each, < 2^bits) into shape.packed_bytes() bytes.
void pack_codes(const uint8_t* codes, const Shape& shape, uint8_t* packed);
// Inverse of pack_codes: restores the N x K codes exactly.
void unpack_codes(const uint8_t* packed, const Shape& shape, uint8_t* codes);
// Packs N x G fp16 scales into shape.packed_scale_count() values (padding rows get scale 0).
void pack_scales(const uint16_t* scales, const Shape& shape, uint16_t* packed);
void unpack_scales(const uint16_t* packed, const Shape& shape, uint16_t* scales);

// Position of one code inside the packed codes: the byte holding its low bits and their shift; a 3-bit
// code with shift > 5 continues (its bits from 8 - shift on) at bit 0 of hi_byte. Exposed for tests and
// documentation.
struct CodePosition {
  int64_t byte = 0; int shift = 0;
  int64_t hi_byte = -1;  // 3 bits only, for codes that straddle two bytes
};
CodePosition code_position(const Shape& shape, int64_t n, int64_t k);

// Pair-table index of the pair (q0, q1) as the kernel reads it: q0 | q1 << bits.
int pair_index(int bits, int q0, int q1);
// Converts packed codes of format version 1 (docs/format.md: 3 bits stored low bits and high bits
// apart) to the current layout; 2 and 4 bits are the same in both and are copied.
void repack_v1_codes(const uint8_t* v1, const Shape& shape, uint8_t* packed);
// The 2^(2 bits) table of value pairs indexed by pair_index: entries (T[q0], T[q1]) as 2 floats each.
std::vector<float> pair_table(const float* table, int bits);

// Copies the sub-matrix rows [n0, n0 + n_len), columns [k0, k0 + k_len) of a packed weight (and its
// packed scales) without unpacking. n0 and n_len must be multiples of 16 (n_len may reach N), k0 and
// k_len multiples of 128 and of the group size (k_len may reach K). Returns the sub-shape.
Shape slice_packed(const Shape& shape, const uint8_t* packed, const uint16_t* packed_scales, int64_t n0,
                   int64_t n_len, int64_t k0, int64_t k_len, std::vector<uint8_t>* out_packed,
                   std::vector<uint16_t>* out_scales);

}  // namespace lutmm
