/* What Python reads from the library at load (kernels/native/build.py): the ABI version, the constants
 * its arrays and checks depend on, and the vector width of this build. The scratch sizes are functions
 * beside their layouts (charloom_*_scratch_floats). */
#include "kernel.h"

int charloom_abi_version(void) { return ABI_VERSION; }

/* The constant called `name`, or -1 for a name this build does not know. */
long charloom_constant(const char *name) {
    static const struct {
        const char *name;
        long value;
    } table[] = {
        {"max_layers", MAX_LAYERS},         /* Net's per-layer arrays */
        {"net_bytes", (long)sizeof(Net)},   /* checked against Python's copy of Net's layout */
        {"lstm_block", LSTM_BLOCK},         /* the training kernels' blocks of gate columns */
        {"tile_rows", TILE_ROWS},           /* rows of one register tile: more rows read w's blocks again */
        {"mog_max_rounds", MOG_MAX_ROUNDS}, /* the most Mogrifier rounds the training kernel runs */
        {"status_no_memory", STATUS_NO_MEMORY}, /* what the entry points return, named in Python's errors */
        {"status_bad_shape", STATUS_BAD_SHAPE},
        {"status_short", STATUS_SHORT},
        {"status_bad_id", STATUS_BAD_ID},
    };
    for (size_t k = 0; k < sizeof table / sizeof table[0]; k++)
        if (strcmp(table[k].name, name) == 0)
            return table[k].value;
    return -1;
}

/* The widest vector instructions this build was compiled for, in bits: what `native.describe` reports. */
int charloom_vector_bits(void) {
#if defined(__AVX512F__)
    return 512;
#elif defined(__AVX2__) || defined(__AVX__)
    return 256;
#elif defined(__SSE2__) || defined(__ARM_NEON)
    return 128;
#else
    return 0;
#endif
}

int buffers_short(const size_t *need, const size_t *have, int n) {
    if (!have)
        return STATUS_SHORT;
    for (int k = 0; k < n; k++)
        if (have[k] < need[k])
            return STATUS_SHORT;
    return 0;
}

int ids_outside(const int64_t *ids, size_t n, int V) {
    for (size_t k = 0; k < n; k++)
        if (ids[k] < 0 || ids[k] >= V)
            return STATUS_BAD_ID;
    return 0;
}
