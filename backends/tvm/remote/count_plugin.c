/* dcgraph's instruction counter for qemu-user (TCG plugin API v1; no QEMU headers needed).
 *
 * Counts every executed guest instruction by class, decoded once per translation block:
 * vector FMA (FMLA/FMLS, vector and by element) and their lanes, other Advanced SIMD vector
 * instructions, loads/stores, branches/system, scalar floating point, scalar integer.
 * The guest marks phases with a system call nobody makes: lseek(-1, 0xDC0 << 32 | label, 0)
 * (EBADF in the guest); at each marker the cumulative counters are appended to the output file as
 * "label total fma fma_lanes vector ldst branch scalar_fp scalar_int".
 * Inline counters are not atomic: count a single-threaded guest.
 *
 * Built by dcgraph.backends.tvm.remote.arm_count: gcc -O2 -shared -fPIC. The few plugin API
 * functions it uses are declared here (Debian packages no QEMU plugin header).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef uint64_t qemu_plugin_id_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
typedef struct qemu_info_t qemu_info_t;
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };
typedef void (*tb_trans_cb_t)(qemu_plugin_id_t, struct qemu_plugin_tb *);
typedef void (*udata_cb_t)(qemu_plugin_id_t, void *);
typedef void (*syscall_cb_t)(qemu_plugin_id_t, unsigned int, int64_t, uint64_t, uint64_t, uint64_t,
                             uint64_t, uint64_t, uint64_t, uint64_t, uint64_t);

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t, tb_trans_cb_t);
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *, enum qemu_plugin_op, void *, uint64_t);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *);
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *, size_t);
const void *qemu_plugin_insn_data(const struct qemu_plugin_insn *);
size_t qemu_plugin_insn_size(const struct qemu_plugin_insn *);
void qemu_plugin_register_vcpu_syscall_cb(qemu_plugin_id_t, syscall_cb_t);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t, udata_cb_t, void *);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

enum { TOTAL, FMA, FMA_LANES, VECTOR, LDST, BRANCH, SCALAR_FP, SCALAR_INT, NCLASS };
#define AARCH64_LSEEK 62
#define MARK 0xDC0ULL


static uint64_t counters[NCLASS];
static FILE *out;

static unsigned fma_lanes(uint32_t w) {
  int vec = (w & 0xBFA0FC00u) == 0x0E20CC00u || (w & 0xBFA0FC00u) == 0x0EA0CC00u; /* FMLA/FMLS vector */
  int elem = (w & 0xBF80F400u) == 0x0F801000u || (w & 0xBF80F400u) == 0x0F805000u; /* by element */
  if (!vec && !elem) return 0;
  unsigned bits = (w >> 30) & 1 ? 128 : 64, esize = (w >> 22) & 1 ? 64 : 32;
  return bits / esize;
}

static int classify(uint32_t w, unsigned *lanes) {
  *lanes = 0;
  if ((w & 0x0A000000u) == 0x08000000u) return LDST;     /* op0 x1x0 */
  if ((w & 0x1C000000u) == 0x14000000u) return BRANCH;   /* op0 x101: branches, system */
  if ((w & 0x0E000000u) == 0x0E000000u) {                /* op0 x111: SIMD and FP */
    if ((*lanes = fma_lanes(w))) return FMA;
    return (w & 0x90000000u) == 0 ? VECTOR : SCALAR_FP; /* Advanced SIMD vector: bits 31, 28 clear */
  }
  return SCALAR_INT;
}

static void on_tb(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
  uint64_t n[NCLASS] = {0};
  size_t count = qemu_plugin_tb_n_insns(tb);
  for (size_t i = 0; i < count; i++) {
    struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
    uint32_t w = 0;
    memcpy(&w, qemu_plugin_insn_data(insn), qemu_plugin_insn_size(insn) < 4 ? qemu_plugin_insn_size(insn) : 4);
    unsigned lanes;
    n[classify(w, &lanes)]++;
    n[FMA_LANES] += lanes;
  }
  n[TOTAL] = count;
  for (int k = 0; k < NCLASS; k++)
    if (n[k]) qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &counters[k], n[k]);
}

static void dump(const char *label) {
  fprintf(out, "%s", label);
  for (int k = 0; k < NCLASS; k++) fprintf(out, " %llu", (unsigned long long)counters[k]);
  fputc('\n', out);
  fflush(out);
}

static void on_syscall(qemu_plugin_id_t id, unsigned int vcpu, int64_t num, uint64_t a1, uint64_t a2,
                       uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6, uint64_t a7, uint64_t a8) {
  if (num != AARCH64_LSEEK || a1 != UINT64_MAX || (a2 >> 32) != MARK) return;
  char label[32];
  snprintf(label, sizeof label, "%llu", (unsigned long long)(a2 & 0xFFFFFFFFULL));
  dump(label);
}

static void on_quit(qemu_plugin_id_t id, void *p) { dump("exit"); fclose(out); }

__attribute__((visibility("default")))
int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv) {
  const char *path = NULL;
  for (int i = 0; i < argc; i++)
    if (!strncmp(argv[i], "out=", 4)) path = argv[i] + 4;
  if (!path) { fprintf(stderr, "dcgraph_count: out=FILE is required\n"); return -1; }
  out = fopen(path, "w");
  if (!out) { perror(path); return -1; }
  qemu_plugin_register_vcpu_tb_trans_cb(id, on_tb);
  qemu_plugin_register_vcpu_syscall_cb(id, on_syscall);
  qemu_plugin_register_atexit_cb(id, on_quit, NULL);
  return 0;
}
