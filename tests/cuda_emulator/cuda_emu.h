/*
 * A CUDA execution model on the host, for testing bnfast's kernels without a
 * GPU: the .cu files compile with g++ against this header and run block by
 * block, each thread of a block a cooperative fiber (started with ucontext,
 * switched with _setjmp/_longjmp, which skip the signal-mask system call
 * swapcontext makes on every switch). A fiber runs
 * until __syncthreads, a warp shuffle (which synchronises the block) or its
 * end; one round of the scheduler resumes every live fiber once, so a round
 * is one barrier phase. Blocks run one after another, so __shared__ (static
 * storage here) belongs to the running block. It checks what a GPU would
 * silently get wrong: a barrier that only some threads reach aborts the
 * launch. It models semantics, not speed, memory ordering or occupancy.
 */
#ifndef BNFAST_CUDA_EMU_H
#define BNFAST_CUDA_EMU_H

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <csetjmp>
#include <cstring>
#include <ucontext.h>
#include <utility>
#include <vector>

using std::isfinite;
using std::sqrt;

#define __global__
#define __device__
#define __shared__ static

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

static dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emu {

struct Fiber {
    ucontext_t context;
    jmp_buf resume;
    dim3 index;
    bool started;
    bool done;
    bool yielded;
};

static std::vector<Fiber> fibers;
static std::vector<char> stacks;
static jmp_buf scheduler;
static int current;
static void (*body)(void *);
static void *body_args;
static const size_t STACK = 64 * 1024;
static double exchange[2][1024];   /* two, used in turn: see __shfl_xor_sync */
static int exchange_turn;
static char error[256];

static void fiber_main()
{
    body(body_args);
    fibers[current].done = true;
    _longjmp(scheduler, 1);
}

static void yield()
{
    fibers[current].yielded = true;
    if (!_setjmp(fibers[current].resume)) _longjmp(scheduler, 1);
}

static void resume(int t)
{
    Fiber &f = fibers[t];
    if (_setjmp(scheduler)) return;   /* the fiber yielded or finished */
    if (!f.started) {
        f.started = true;
        setcontext(&f.context);
    }
    _longjmp(f.resume, 1);
}

/* Runs every block of the grid; returns 0, or -1 with `error` set. */
static int run_grid(dim3 grid, dim3 block, void (*kernel_body)(void *), void *args)
{
    const int n = block.x * block.y * block.z;
    if (n > 1024 || n % 32 != 0) {
        snprintf(error, sizeof error, "block of %d threads: need a multiple of 32, <= 1024", n);
        return -1;
    }
    gridDim = grid;
    blockDim = block;
    body = kernel_body;
    body_args = args;
    fibers.assign(n, Fiber());
    stacks.assign((size_t)n * STACK, 0);
    ucontext_t start;
    getcontext(&start);
    for (unsigned bz = 0; bz < grid.z; bz++)
    for (unsigned by = 0; by < grid.y; by++)
    for (unsigned bx = 0; bx < grid.x; bx++) {
        blockIdx.x = bx; blockIdx.y = by; blockIdx.z = bz;
        for (int t = 0; t < n; t++) {
            Fiber &f = fibers[t];
            f.index.x = t % block.x;
            f.index.y = (t / block.x) % block.y;
            f.index.z = t / (block.x * block.y);
            f.started = f.done = false;
            f.context = start;
            f.context.uc_stack.ss_sp = &stacks[(size_t)t * STACK];
            f.context.uc_stack.ss_size = STACK;
            f.context.uc_link = nullptr;
            makecontext(&f.context, fiber_main, 0);
        }
        for (;;) {   /* one round = one barrier phase */
            int n_yielded = 0, n_finished = 0;
            for (int t = 0; t < n; t++) {
                if (fibers[t].done) continue;
                current = t;
                threadIdx = fibers[t].index;
                fibers[t].yielded = false;
                resume(t);
                if (fibers[t].yielded) n_yielded++; else n_finished++;
            }
            if (n_yielded == 0) break;
            if (n_finished != 0) {
                snprintf(error, sizeof error, "block (%u, %u): %d threads wait at a barrier "
                         "that %d finished threads never reach", bx, by, n_yielded, n_finished);
                return -1;
            }
        }
    }
    return 0;
}

}  // namespace emu

static void __syncthreads() { emu::yield(); }

template <class T>
static T __shfl_xor_sync(unsigned mask, T value, int lane_mask)
{
    (void)mask;
    /* write, wait for the block, read. The next shuffle writes the other
     * buffer, so a thread ahead never overwrites a value not yet read; the
     * one after waits behind a barrier that every reader has passed. */
    const int tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    double *buffer = emu::exchange[emu::exchange_turn];
    buffer[tid] = (double)value;
    emu::yield();
    if (tid == 0) emu::exchange_turn ^= 1;
    return (T)buffer[tid ^ lane_mask];
}

static int atomicAdd(int *address, int value)
{
    int old = *address;   /* fibers never interleave inside a call */
    *address = old + value;
    return old;
}

/* The launch ABI CuPy uses: args[i] points at the i-th parameter's value. */
template <class... A, size_t... I>
static void call_with(void (*kernel)(A...), void **args, std::index_sequence<I...>)
{
    kernel(*static_cast<A *>(args[I])...);
}

template <class... A>
static int emu_launch(void (*kernel)(A...), const unsigned *grid, const unsigned *block,
                      void **args)
{
    struct Call { void (*kernel)(A...); void **args; } call{kernel, args};
    dim3 g, b;
    g.x = grid[0]; g.y = grid[1]; g.z = grid[2];
    b.x = block[0]; b.y = block[1]; b.z = block[2];
    return emu::run_grid(g, b, [](void *p) {
        Call *c = static_cast<Call *>(p);
        call_with(c->kernel, c->args, std::index_sequence_for<A...>{});
    }, &call);
}

#define EMU_EXPORT(name) \
    extern "C" int emu_##name(const unsigned *grid, const unsigned *block, void **args) \
    { return emu_launch(name, grid, block, args); }

extern "C" const char *emu_error(void) { return emu::error; }

#endif
