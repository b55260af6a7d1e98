// The emulator's scheduler (see include/emu.h): runs a launch's blocks one after another, each
// block as one fiber per thread, and resolves __syncthreads and warp intrinsics with CUDA's
// rules. Also enforces sm_90's launch limits, so a launch that would fail on the device fails
// here: at most 1024 threads (block.z <= 64), grid.y/z <= 65535, 48 KiB of static shared
// memory, 48 KiB of dynamic shared memory unless raised by cudaFuncSetAttribute (227 KiB max).
#include "emu.h"

#include <map>
#include <set>

#if defined(__x86_64__)
// A fiber switch saves the callee-saved registers on the old stack and pops them off the new
// one. swapcontext does the same plus a sigprocmask system call per switch, which made the
// emulator several times slower: kernels switch at every barrier, in every thread.
extern "C" void emu_switch_stack(void** save_sp, void* load_sp);
asm(R"(
    .text
    .globl emu_switch_stack
    .type emu_switch_stack, @function
emu_switch_stack:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch_stack, .-emu_switch_stack
)");
#endif

namespace emu {

Fiber* current = nullptr;
uint3 block_idx;
dim3 block_dim, grid_dim;
long errors = 0, warnings = 0;

namespace {

constexpr size_t kPage = 4096;
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kDefaultSmem = 48 * 1024, kMaxSmem = 227 * 1024;

#if defined(__x86_64__)
void* scheduler_sp = nullptr;
#else
ucontext_t scheduler;
#endif
std::vector<Fiber> fibers;
const std::function<void()>* body_fn = nullptr;
void* dyn_smem = nullptr;
std::set<void*> smem_seen_in_block;
std::map<void*, size_t> smem_seen_in_launch;
std::map<std::string, int> max_dynamic_smem;

enum class Order { forward, reverse, random };
Order order_from_env() {
    const char* e = std::getenv("EMU_ORDER");
    const std::string s = e ? e : "forward";
    if (s == "reverse") return Order::reverse;
    if (s == "random") return Order::random;
    if (s != "forward") {
        std::fprintf(stderr, "EMU_ORDER=%s: expected forward, reverse or random\n", s.c_str());
        std::exit(2);
    }
    return Order::forward;
}
const Order order = order_from_env();
std::mt19937 rng(std::getenv("EMU_SEED") ? unsigned(std::atoi(std::getenv("EMU_SEED"))) : 1u);

// An emulator error must fail the run even where the checks themselves pass: each group runs
// in a child process of gpu_checks' harness, which counts "FAIL!  :" lines and crashes.
struct ExitVerdict {
    ExitVerdict() {
        std::atexit([] {
            if (errors == 0) return;
            std::fflush(stderr);
            std::printf("FAIL!  : emulator  %ld EMU ERROR finding(s), see the EMU lines\n", errors);
            std::fflush(stdout);
            _exit(3);
        });
    }
} exit_verdict;

[[noreturn]] void fiber_entry() {
    (*body_fn)();
    current->state = State::done;
    yield_to_scheduler();  // never resumed
    std::abort();
}

void start_fiber(Fiber& t) {
#if defined(__x86_64__)
    // The frame emu_switch_stack pops: six registers, then fiber_entry as the return address,
    // above it a null return address for fiber_entry (whose entry expects rsp = 8 mod 16).
    auto* top = reinterpret_cast<void**>(t.stack + kStackBytes);
    top[-1] = nullptr;
    top[-2] = reinterpret_cast<void*>(&fiber_entry);
    for (int r = 3; r <= 8; ++r) top[-r] = nullptr;
    t.sp = top - 8;
#else
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = t.stack;
    t.ctx.uc_stack.ss_size = kStackBytes;
    t.ctx.uc_link = nullptr;
    makecontext(&t.ctx, fiber_entry, 0);
#endif
}

void resume(Fiber& t) {
    current = &t;
#if defined(__x86_64__)
    emu_switch_stack(&scheduler_sp, t.sp);
#else
    swapcontext(&scheduler, &t.ctx);
#endif
}

std::string where(const char* name, uint3 b) {
    return std::string(name) + " block (" + std::to_string(b.x) + "," + std::to_string(b.y) + "," +
           std::to_string(b.z) + ")";
}

// Lanes of warp w waiting at a warp op: if all lanes of the first waiter's mask are there,
// compute each lane's result and let them run on. Returns whether the warp made progress.
bool resolve_warp(const char* name, int w, unsigned nt) {
    auto lane = [&](int l) -> Fiber* {
        const int i = w * 32 + l;
        return i < int(nt) ? &fibers[size_t(i)] : nullptr;
    };
    Fiber* first = nullptr;
    for (int l = 0; l < 32 && !first; ++l)
        if (lane(l) && lane(l)->state == State::warp_op) first = lane(l);
    if (!first) return false;
    const unsigned mask = first->mask;
    bool ready = true, bad = false;
    std::string why;
    for (int l = 0; l < 32 && ready && !bad; ++l) {
        if (!((mask >> l) & 1)) continue;
        Fiber* t = lane(l);
        if (!t) {
            bad = true, why = "mask names lane " + std::to_string(l) + " past the block";
        } else if (t->state == State::done) {
            bad = true, why = "mask names exited lane " + std::to_string(l);
        } else if (t->state == State::block_barrier) {
            bad = true, why = "lane " + std::to_string(l) + " waits at __syncthreads line " + std::to_string(t->line);
        } else if (t->state != State::warp_op) {
            ready = false;  // that lane has not reached a warp op yet: run it first
        } else if (t->mask != mask) {
            bad = true, why = "lanes disagree on the mask";
        } else if (t->line != first->line || t->kind != first->kind) {
            // Legal in CUDA (sync across sites), but rarely meant: worth a look, not a failure.
            report(false, std::string(name) + ": one warp op at lines " + std::to_string(t->line) + " and " +
                              std::to_string(first->line));
        }
    }
    if (bad)  // released anyway, with whatever values are there, so the run can go on
        report(true, where(name, block_idx) + " warp " + std::to_string(w) + ", warp op at line " +
                         std::to_string(first->line) + ": " + why);
    else if (!ready)
        return false;
    unsigned ballot_bits = 0;
    for (int l = 0; l < 32; ++l)
        if (((mask >> l) & 1) && lane(l) && lane(l)->state == State::warp_op && lane(l)->value) ballot_bits |= 1u << l;
    for (int l = 0; l < 32; ++l) {
        Fiber* t = lane(l);
        if (!((mask >> l) & 1) || !t || t->state != State::warp_op) continue;
        const int wd = t->width, seg = l & ~(wd - 1);
        int src = l;
        switch (t->kind) {
            case shfl: src = seg + (t->arg & (wd - 1)); break;
            case shfl_xor: src = (((l ^ t->arg) & ~(wd - 1)) == seg) ? (l ^ t->arg) : l; break;
            case shfl_down: src = (l - seg) + t->arg < wd ? l + t->arg : l; break;
            case shfl_up: src = (l - seg) - t->arg >= 0 ? l - t->arg : l; break;
            default: break;
        }
        if (t->kind <= shfl_up) {
            Fiber* s = lane(src);
            if (!((mask >> src) & 1) || !s || s->state != State::warp_op) {
                // Undefined on the device: a recognisable value, and an error.
                report(true, std::string(name) + ": shuffle at line " + std::to_string(t->line) + " reads lane " +
                                 std::to_string(src) + ", not in the mask or not at the shuffle");
                t->result = 0xdeadbeefdeadbeefull;
            } else {
                t->result = s->value;
            }
        } else if (t->kind == ballot) {
            t->result = ballot_bits;
        }
    }
    for (int l = 0; l < 32; ++l)
        if (((mask >> l) & 1) && lane(l) && lane(l)->state == State::warp_op) lane(l)->state = State::run;
    return true;
}

void run_block(const char* name, unsigned nt) {
    for (unsigned i = 0; i < nt; ++i) {
        Fiber& t = fibers[i];
        t.tid = {i % block_dim.x, (i / block_dim.x) % block_dim.y, i / (block_dim.x * block_dim.y)};
        t.state = State::run;
        start_fiber(t);
    }
    std::vector<int> sequence(nt);
    for (;;) {
        for (unsigned i = 0; i < nt; ++i) sequence[i] = order == Order::reverse ? int(nt - 1 - i) : int(i);
        if (order == Order::random) std::shuffle(sequence.begin(), sequence.end(), rng);
        // Every runnable fiber runs until it exits or reaches a barrier.
        for (bool ran = true; ran;) {
            ran = false;
            for (int i : sequence)
                if (fibers[size_t(i)].state == State::run) {
                    resume(fibers[size_t(i)]);
                    ran = true;
                }
        }
        bool progress = false;
        for (int w = 0; w < int((nt + 31) / 32); ++w) progress |= resolve_warp(name, w, nt);
        if (progress) continue;
        int done = 0, at_barrier = 0, at_warp = 0, line = -1;
        bool lines_differ = false;
        for (unsigned i = 0; i < nt; ++i) {
            const Fiber& t = fibers[i];
            if (t.state == State::done) ++done;
            if (t.state == State::warp_op) ++at_warp;
            if (t.state == State::block_barrier) {
                ++at_barrier;
                lines_differ |= line >= 0 && line != t.line;
                line = t.line;
            }
        }
        if (done == int(nt)) return;
        if (at_warp == 0 && at_barrier > 0) {
            // Exited threads do not count at a barrier on sm_70+, but it usually means a bug.
            if (done > 0)
                report(false, std::string(name) + ": __syncthreads (line " + std::to_string(line) + ") reached with " +
                                  std::to_string(done) + " exited threads");
            if (lines_differ) report(true, where(name, block_idx) + ": threads wait at different __syncthreads");
            for (unsigned i = 0; i < nt; ++i)
                if (fibers[i].state == State::block_barrier) fibers[i].state = State::run;
            continue;
        }
        report(true, where(name, block_idx) + ": deadlock (" + std::to_string(at_warp) + " threads at warp ops, " +
                         std::to_string(at_barrier) + " at __syncthreads, " + std::to_string(done) + " exited)");
        std::exit(3);  // no way to continue the block
    }
}

}  // namespace

void report(bool error, const std::string& message) {
    static int shown = 0;
    (error ? errors : warnings)++;
    if (shown++ < 40) std::fprintf(stderr, "EMU %s: %s\n", error ? "ERROR" : "warning", message.c_str());
}

void yield_to_scheduler() {
#if defined(__x86_64__)
    emu_switch_stack(&current->sp, scheduler_sp);
#else
    swapcontext(&current->ctx, &scheduler);
#endif
}

uint64_t warp_op(int kind, unsigned mask, uint64_t value, int arg, int width, int line) {
    current->state = State::warp_op;
    current->kind = kind;
    current->mask = mask;
    current->value = value;
    current->arg = arg;
    current->width = width;
    current->line = line;
    yield_to_scheduler();
    return current->result;
}

void* dynamic_smem() { return dyn_smem; }

void note_static_smem(void* p, size_t bytes) {
    smem_seen_in_launch[p] = bytes;
    if (smem_seen_in_block.insert(p).second) std::memset(p, 0xff, bytes);
}

void set_max_dynamic_smem(const char* name, int bytes) { max_dynamic_smem[name] = bytes; }

void launch(const char* name, dim3 g, dim3 b, size_t smem, const std::function<void()>& body) {
    const unsigned nt = b.x * b.y * b.z;
    const std::string n = name;
    if (nt == 0 || nt > 1024) report(true, n + ": block of " + std::to_string(nt) + " threads (1..1024)");
    if (b.z > 64) report(true, n + ": block.z " + std::to_string(b.z) + " > 64");
    if (g.y > 65535 || g.z > 65535)
        report(true, n + ": grid.y/z " + std::to_string(g.y) + "/" + std::to_string(g.z) + " > 65535");
    if (g.x == 0 || g.y == 0 || g.z == 0) report(true, n + ": empty grid");
    const auto attr = max_dynamic_smem.find(n);
    const size_t smem_limit = attr == max_dynamic_smem.end() ? kDefaultSmem : size_t(attr->second);
    if (smem > smem_limit)
        report(true, n + ": dynamic smem " + std::to_string(smem) + " > " + std::to_string(smem_limit) +
                         (attr == max_dynamic_smem.end() ? " (48 KiB without cudaFuncSetAttribute)" : " (its attribute)"));
    if (smem_limit > kMaxSmem) report(true, n + ": max dynamic smem attribute above sm_90's 227 KiB");
    if (nt == 0 || nt > 1024 || g.x == 0 || g.y == 0 || g.z == 0) return;
    if (fibers.empty()) {
        // One stack per thread of the largest block, each above a guard page: a fiber that
        // overflows its stack faults instead of writing over its neighbour's.
        fibers.resize(1024);
        for (auto& t : fibers) {
            char* m = static_cast<char*>(mmap(nullptr, kStackBytes + kPage, PROT_READ | PROT_WRITE,
                                              MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
            if (m == MAP_FAILED) {
                std::perror("emu: mmap of fiber stacks");
                std::exit(3);
            }
            mprotect(m, kPage, PROT_NONE);
            t.stack = m + kPage;
        }
    }
    body_fn = &body;
    grid_dim = g;
    block_dim = b;
    // Dynamic shared memory ends at a guard page: an over-run faults at once.
    const size_t bytes = (std::max<size_t>(smem, 4) + 15) / 16 * 16, pages = (bytes + kPage - 1) / kPage;
    const size_t map_bytes = (pages + 2) * kPage;
    char* region = static_cast<char*>(mmap(nullptr, map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (region == MAP_FAILED) {
        std::perror("emu: mmap");
        std::exit(3);
    }
    mprotect(region, kPage, PROT_NONE);
    mprotect(region + (pages + 1) * kPage, kPage, PROT_NONE);
    dyn_smem = region + (pages + 1) * kPage - bytes;
    smem_seen_in_launch.clear();
    // Blocks run in EMU_ORDER too: CUDA promises no order between blocks, so a block that
    // writes into its neighbour's part of the output is caught in one order or the other.
    const uint64_t nblocks = uint64_t(g.x) * g.y * g.z;
    std::vector<uint64_t> block_order;
    if (order == Order::random) {
        block_order.resize(nblocks);
        for (uint64_t i = 0; i < nblocks; ++i) block_order[i] = i;
        std::shuffle(block_order.begin(), block_order.end(), rng);
    }
    for (uint64_t k = 0; k < nblocks; ++k) {
        const uint64_t b_lin = order == Order::forward ? k : order == Order::reverse ? nblocks - 1 - k : block_order[k];
        block_idx = {unsigned(b_lin % g.x), unsigned(b_lin / g.x % g.y), unsigned(b_lin / (uint64_t(g.x) * g.y))};
        // NaN in every float of a fresh block's shared memory: uninitialised reads show.
        for (size_t i = 0; i < bytes / 4; ++i) static_cast<float*>(dyn_smem)[i] = NAN;
        smem_seen_in_block.clear();
        run_block(name, nt);
    }
    munmap(region, map_bytes);
    size_t static_bytes = 0;
    for (const auto& [p, nb] : smem_seen_in_launch) static_bytes += nb;
    if (static_bytes > kDefaultSmem)
        report(true, n + ": " + std::to_string(static_bytes) + " bytes of static shared memory > 48 KiB");
    if (static_bytes + smem > kMaxSmem) report(true, n + ": static + dynamic shared memory above 227 KiB");
}

}  // namespace emu
