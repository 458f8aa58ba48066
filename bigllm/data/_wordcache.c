/* The word cache's hot loop in C, for bigllm/data/wordcache.py (loaded with ctypes, built on
 * first use by bigllm/data/native.py). SentencePiece still encodes every new word; this file only
 * splits UTF-8 text at whitespace, looks each word up, and concatenates the cached token ids, the
 * part that costs ~0.3 us a word in Python (a str object, a hash, a dict probe, a bytes join).
 *
 * Per chunk:  wc_begin -> wc_scan (word -> entry; new words listed) -> the caller encodes the new
 * words with SentencePiece -> wc_fill (their ids) -> wc_count + wc_emit (the chunk's ids).
 *
 * Layout: entries (key bytes and token ids in two arenas) and an open-addressing index of entry
 * numbers + 1 (0: empty slot), at most half full, linear probing on a 64-bit FNV-1a hash. Each key
 * is followed by a space in its arena (no word holds one), so the new words of a chunk are one
 * space-separated UTF-8 string for Python: one decode and one split.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    uint64_t hash;
    int64_t key_off, tok_off; /* tok_off < 0: pending, ids not filled yet */
    int32_t key_len, tok_len;
} entry_t;

typedef struct {
    entry_t *entries;
    int64_t n_entries, cap_entries, first_pending;
    uint32_t *index;
    uint64_t mask; /* index size - 1 */
    uint8_t *keys;
    int64_t keys_len, keys_cap;
    int32_t *toks;
    int64_t toks_len, toks_cap;
    uint8_t ascii_space[128];
    uint32_t spaces[64]; /* non-ASCII whitespace code points */
    int n_spaces;
} wc_t;

static int grow(void **buf, int64_t *cap, int64_t need, size_t item) {
    if (need <= *cap) return 0;
    int64_t c = *cap ? *cap : 1024;
    while (c < need) c *= 2;
    void *p = realloc(*buf, (size_t)c * item);
    if (!p) return -1;
    *buf = p;
    *cap = c;
    return 0;
}

static uint64_t fnv1a(const uint8_t *s, int64_t n) {
    uint64_t h = 1469598103934665603ULL;
    for (int64_t i = 0; i < n; i++) h = (h ^ s[i]) * 1099511628211ULL;
    return h;
}

static int rehash(wc_t *c, uint64_t size) {
    uint32_t *index = calloc(size, sizeof(uint32_t));
    if (!index) return -1;
    free(c->index);
    c->index = index;
    c->mask = size - 1;
    for (int64_t e = 0; e < c->n_entries; e++) {
        uint64_t i = c->entries[e].hash & c->mask;
        while (index[i]) i = (i + 1) & c->mask;
        index[i] = (uint32_t)(e + 1);
    }
    return 0;
}

/* `spaces`: every whitespace code point (where Python's str.split() splits). */
wc_t *wc_new(const uint32_t *spaces, int n_spaces) {
    wc_t *c = calloc(1, sizeof(wc_t));
    if (!c || n_spaces > 64) return NULL;
    for (int i = 0; i < n_spaces; i++) {
        if (spaces[i] < 128) c->ascii_space[spaces[i]] = 1;
        else c->spaces[c->n_spaces++] = spaces[i];
    }
    if (rehash(c, 1 << 16)) return NULL;
    return c;
}

void wc_free(wc_t *c) {
    if (!c) return;
    free(c->entries);
    free(c->index);
    free(c->keys);
    free(c->toks);
    free(c);
}

int64_t wc_size(const wc_t *c) { return c->n_entries; }

/* Forget every entry (the caller's bound on words or bytes was exceeded). */
void wc_clear(wc_t *c) {
    c->n_entries = c->first_pending = c->keys_len = c->toks_len = 0;
    memset(c->index, 0, (c->mask + 1) * sizeof(uint32_t));
}

/* Start a chunk: the entries added from now on are its new words (pending until wc_fill). Words
 * a failed chunk left without ids must not be served: then the cache starts empty. */
void wc_begin(wc_t *c) {
    if (c->first_pending != c->n_entries) wc_clear(c);
    c->first_pending = c->n_entries;
}

/* Bytes held by keys and token ids. */
int64_t wc_bytes(const wc_t *c) { return c->keys_len + c->toks_len * (int64_t)sizeof(int32_t); }

/* Whether the UTF-8 sequence at s (n bytes left, s[0] >= 0x80) is whitespace; its length in *len. */
static int wide_space(const wc_t *c, const uint8_t *s, int64_t n, int *len) {
    uint32_t cp;
    if (s[0] >= 0xF0 && n >= 4) {
        cp = (s[0] & 7u) << 18 | (s[1] & 63u) << 12 | (s[2] & 63u) << 6 | (s[3] & 63u);
        *len = 4;
    } else if (s[0] >= 0xE0 && n >= 3) {
        cp = (s[0] & 15u) << 12 | (s[1] & 63u) << 6 | (s[2] & 63u);
        *len = 3;
    } else if (s[0] >= 0xC0 && n >= 2) {
        cp = (s[0] & 31u) << 6 | (s[1] & 63u);
        *len = 2;
    } else {
        *len = 1;
        return 0;
    }
    for (int i = 0; i < c->n_spaces; i++)
        if (c->spaces[i] == cp) return 1;
    return 0;
}

static int64_t find(wc_t *c, const uint8_t *key, int32_t len, uint64_t hash) {
    uint64_t i = hash & c->mask;
    for (uint32_t slot; (slot = c->index[i]); i = (i + 1) & c->mask) {
        const entry_t *e = &c->entries[slot - 1];
        if (e->hash == hash && e->key_len == len && !memcmp(c->keys + e->key_off, key, (size_t)len))
            return slot - 1;
    }
    return -1 - (int64_t)i; /* the free slot */
}

static int64_t add(wc_t *c, const uint8_t *key, int32_t len, uint64_t hash, int64_t slot) {
    if (grow((void **)&c->entries, &c->cap_entries, c->n_entries + 1, sizeof(entry_t)) ||
        grow((void **)&c->keys, &c->keys_cap, c->keys_len + len + 1, 1))
        return -1;
    int64_t e = c->n_entries++;
    c->entries[e] = (entry_t){hash, c->keys_len, -1, len, 0};
    memcpy(c->keys + c->keys_len, key, (size_t)len);
    c->keys[c->keys_len + len] = ' ';
    c->keys_len += len + 1;
    c->index[slot] = (uint32_t)(e + 1);
    if ((uint64_t)c->n_entries * 2 > c->mask + 1 && rehash(c, (c->mask + 1) * 2)) return -1;
    return e;
}

/* Split text[0:n] at whitespace (as str.split() does) and map each word to its entry in word[],
 * adding words not seen before as pending entries. Returns the number of words (word[] needs
 * n / 2 + 1 slots), or -1 when out of memory. The pending entries are the new words, in order:
 * wc_pending lists them. */
int64_t wc_scan(wc_t *c, const uint8_t *text, int64_t n, uint32_t *word) {
    int64_t n_words = 0, i = 0;
    while (i < n) {
        int len = 1;
        while (i < n && (text[i] < 128 ? c->ascii_space[text[i]] : wide_space(c, text + i, n - i, &len)))
            i += text[i] < 128 ? 1 : len; /* skip whitespace */
        int64_t start = i;
        while (i < n) {
            if (text[i] < 128) {
                if (c->ascii_space[text[i]]) break;
                i++;
            } else {
                if (wide_space(c, text + i, n - i, &len)) break;
                i += len;
            }
        }
        if (i == start) break;
        uint64_t h = fnv1a(text + start, i - start);
        int64_t e = find(c, text + start, (int32_t)(i - start), h);
        if (e < 0 && (e = add(c, text + start, (int32_t)(i - start), h, -1 - e)) < 0) return -1;
        word[n_words++] = (uint32_t)e;
    }
    return n_words;
}

/* How many words are pending (new); if `printable` is not NULL, it is set for each to whether the
 * word is printable ASCII only (bytes 0x21-0x7E: what SentencePiece may encode many to a string). */
int64_t wc_pending(const wc_t *c, uint8_t *printable) {
    for (int64_t e = c->first_pending; printable && e < c->n_entries; e++) {
        const uint8_t *k = c->keys + c->entries[e].key_off;
        uint8_t ok = 1;
        for (int32_t j = 0; j < c->entries[e].key_len; j++) ok &= (uint8_t)(k[j] - 0x21u < 0x5Eu);
        printable[e - c->first_pending] = ok;
    }
    return c->n_entries - c->first_pending;
}

/* The pending words' keys, each followed by a space (*n bytes in all). */
const uint8_t *wc_pending_keys(const wc_t *c, int64_t *n) {
    int64_t from = c->first_pending < c->n_entries ? c->entries[c->first_pending].key_off : c->keys_len;
    *n = c->keys_len - from;
    return c->keys + from;
}

/* Set the ids of the n pending words: the word which[k] (0: the first pending) gets
 * ids[bounds[k]:bounds[k+1]]. */
int wc_fill(wc_t *c, int64_t n, const int64_t *which, const int64_t *bounds, const int32_t *ids) {
    int64_t total = bounds[n];
    if (n != c->n_entries - c->first_pending) return -2;
    if (grow((void **)&c->toks, &c->toks_cap, c->toks_len + total, sizeof(int32_t))) return -1;
    memcpy(c->toks + c->toks_len, ids, (size_t)total * sizeof(int32_t));
    for (int64_t k = 0; k < n; k++) {
        entry_t *e = &c->entries[c->first_pending + which[k]];
        e->tok_off = c->toks_len + bounds[k];
        e->tok_len = (int32_t)(bounds[k + 1] - bounds[k]);
    }
    c->toks_len += total;
    c->first_pending = c->n_entries;
    return 0;
}

/* How many ids the words word[0:n] give. */
int64_t wc_count(const wc_t *c, const uint32_t *word, int64_t n) {
    int64_t total = 0;
    for (int64_t k = 0; k < n; k++) total += c->entries[word[k]].tok_len;
    return total;
}

/* Write the words' ids to out (itemsize 2: uint16, 4: int32), wc_count of them. */
void wc_emit(const wc_t *c, const uint32_t *word, int64_t n, void *out, int itemsize) {
    int64_t at = 0;
    for (int64_t k = 0; k < n; k++) {
        const entry_t *e = &c->entries[word[k]];
        const int32_t *src = c->toks + e->tok_off;
        if (itemsize == 2) {
            uint16_t *dst = (uint16_t *)out + at;
            for (int32_t j = 0; j < e->tok_len; j++) dst[j] = (uint16_t)src[j];
        } else {
            memcpy((int32_t *)out + at, src, (size_t)e->tok_len * sizeof(int32_t));
        }
        at += e->tok_len;
    }
}
