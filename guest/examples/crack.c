/*
 * crack: searches one range of candidate passwords for the one whose SHA-256
 * is given, as a fragment of a John the Ripper run would.
 *
 * Input (text): "SHA256HEX CHARSET LENGTH START COUNT", e.g.
 *   "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824 abcdefghijklmnopqrstuvwxyz 5 0 11881376"
 * tries the COUNT candidates from index START of all LENGTH-character strings
 * over CHARSET (in base-|CHARSET| order).
 * Output: "found PASSWORD\n", or "none\n".
 */
#include "cpushare.h"

static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

/* SHA-256 of a message shorter than 56 bytes (one block): passwords are short. */
static void sha256_short(const unsigned char *msg, size_t len, uint32_t out[8]) {
    unsigned char block[64] = {0};
    for (size_t i = 0; i < len; i++) block[i] = msg[i];
    block[len] = 0x80;
    uint64_t bits = (uint64_t)len * 8;
    for (int i = 0; i < 8; i++) block[63 - i] = (unsigned char)(bits >> (8 * i));
    uint32_t w[64];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)block[4 * i] << 24 | (uint32_t)block[4 * i + 1] << 16 | (uint32_t)block[4 * i + 2] << 8 | block[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = hh + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
        uint32_t t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        hh = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    out[0] = h[0] + a; out[1] = h[1] + b; out[2] = h[2] + c; out[3] = h[3] + d;
    out[4] = h[4] + e; out[5] = h[5] + f; out[6] = h[6] + g; out[7] = h[7] + hh;
}

static char input[512];

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static char *word(char **p) {
    while (**p == ' ' || **p == '\n') (*p)++;
    char *start = *p;
    while (**p && **p != ' ' && **p != '\n') (*p)++;
    if (**p) *(*p)++ = 0;
    return *start ? start : 0;
}

static int parse_u64(const char *s, uint64_t *out) {
    uint64_t v = 0;
    if (!s || !*s) return 0;
    for (; *s; s++) {
        if (*s < '0' || *s > '9') return 0;
        v = v * 10 + (uint64_t)(*s - '0');
    }
    *out = v;
    return 1;
}

int main(void) {
    long n = cs_read_input(input, sizeof input - 1);
    if (n <= 0) { cs_log("crack: expected \"SHA256HEX CHARSET LENGTH START COUNT\""); return 2; }
    input[n] = 0;
    char *p = input;
    char *hex = word(&p), *charset = word(&p);
    uint64_t length, start, count;
    if (!hex || !charset || !parse_u64(word(&p), &length) || !parse_u64(word(&p), &start) || !parse_u64(word(&p), &count)
        || cs_strlen(hex) != 64 || length < 1 || length > 55) {
        cs_log("crack: expected \"SHA256HEX CHARSET LENGTH START COUNT\" (length 1..55)");
        return 2;
    }
    uint32_t target[8] = {0};
    for (int i = 0; i < 64; i++) {
        int v = hexval(hex[i]);
        if (v < 0) { cs_log("crack: the hash is not hexadecimal"); return 2; }
        target[i / 8] |= (uint32_t)v << (28 - 4 * (i % 8));
    }
    uint64_t base = cs_strlen(charset);
    unsigned char candidate[56];
    for (uint64_t idx = start; idx < start + count; idx++) {
        uint64_t x = idx;
        for (uint64_t i = 0; i < length; i++) {
            candidate[length - 1 - i] = (unsigned char)charset[x % base];
            x /= base;
        }
        uint32_t h[8];
        sha256_short(candidate, length, h);
        int same = 1;
        for (int i = 0; i < 8; i++) same &= h[i] == target[i];
        if (same) {
            cs_write_all(1, "found ", 6);
            cs_write_all(1, candidate, length);
            cs_write_all(1, "\n", 1);
            return 0;
        }
    }
    cs_write_all(1, "none\n", 5);
    return 0;
}
