// Runs one kernel launch described in a text file (tests/emulated.rs writes
// it) on the CPU, through cuda_emu.h:
//
//   kernel NAME
//   grid BLOCKS
//   block THREADS
//   shared BYTES
//   buf PATH        a device buffer: the file's bytes (exactly), written back
//                   to the file after the run
//   null            a null pointer
//   u32 N | u64 N | f32 BITS   scalars (an f32 as its u32 bits, decimal)
//
// The arguments follow in the kernel's order. `driver --list` prints the
// kernels it can launch, one a line.
//
// kernels.inc (written by the test) includes every kernel source, processed
// for the shim, each in a namespace of its own.
#include "cuda_emu.h"

#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

#include "kernels.inc"

namespace {

struct Arg {
    std::string kind;  // buf, null, u32, u64, f32
    std::string path;
    void* ptr = nullptr;
    size_t len = 0;
    uint64_t value = 0;
};

// A buffer or null argument, converted to whichever pointer the kernel takes.
struct Ptr {
    void* p;
    template <class T>
    operator T*() const {
        return (T*)p;
    }
};

struct Args {
    std::vector<Arg> v;
    const Arg& at(size_t i, const std::string& kind) const {
        if (i >= v.size()) emu::fail("too few arguments for the kernel");
        const Arg& a = v[i];
        if (a.kind != kind && !(kind == "buf" && a.kind == "null")) {
            std::fprintf(stderr, "argument %zu: %s given, %s expected\n", i, a.kind.c_str(),
                         kind.c_str());
            emu::fail("wrong argument kind");
        }
        return a;
    }
    void expect(size_t n) const {
        if (v.size() != n) {
            std::fprintf(stderr, "%zu arguments given, the kernel takes %zu\n", v.size(), n);
            emu::fail("wrong argument count");
        }
    }
    Ptr p(size_t i) const { return Ptr{at(i, "buf").ptr}; }
    uint32_t u32(size_t i) const { return (uint32_t)at(i, "u32").value; }
    uint64_t u64(size_t i) const { return at(i, "u64").value; }
    float f32(size_t i) const { return __uint_as_float((uint32_t)at(i, "f32").value); }
};

using Runner = void (*)(const Args&, unsigned, unsigned, size_t);
struct Kernel {
    const char* name;
    Runner run;
};

// One entry per `extern "C" __global__` kernel: its arguments, typed by the
// kernel's own signature (a changed signature fails to compile here).
#define KERNEL(NAME, N, ...)                                                         \
    Kernel {                                                                         \
        #NAME, [](const Args& A, unsigned grid, unsigned block, size_t shared) {     \
            A.expect(N);                                                             \
            emu::launch(grid, block, shared, [&] { NAME(__VA_ARGS__); });            \
        }                                                                            \
    }

#define BAG_FORWARD_ARGS \
    A.p(0), A.u32(1), A.u32(2), A.p(3), A.u32(4), A.u32(5), A.p(6), A.p(7), A.p(8), A.u32(9), A.p(10)
#define BAG_WEIGHTS_ARGS A.p(0), A.u32(1), A.u32(2), A.p(3), A.p(4), A.u32(5), A.p(6), A.p(7)

const Kernel KERNELS[] = {
    KERNEL(pk_norm_rows, 5, A.p(0), A.u32(1), A.u32(2), A.f32(3), A.p(4)),
    KERNEL(pk_lookup, 14, A.p(0), A.p(1), A.u32(2), A.u32(3), A.u32(4), A.u32(5), A.u32(6),
           A.f32(7), A.f32(8), A.u32(9), A.u32(10), A.p(11), A.p(12), A.p(13)),
    KERNEL(pk_select_scores, 7, A.p(0), A.u32(1), A.u32(2), A.u32(3), A.u32(4), A.p(5), A.p(6)),
    KERNEL(bag_forward_f32, 11, BAG_FORWARD_ARGS),
    KERNEL(bag_forward_f16, 11, BAG_FORWARD_ARGS),
    KERNEL(bag_forward_bf16, 11, BAG_FORWARD_ARGS),
    KERNEL(copy_f32x4, 3, A.p(0), A.p(1), A.u64(2)),
    KERNEL(bag_backward_table, 10, A.u32(0), A.p(1), A.p(2), A.p(3), A.u32(4), A.p(5), A.p(6),
           A.p(7), A.u32(8), A.p(9)),
    KERNEL(bag_backward_weights_f32, 8, BAG_WEIGHTS_ARGS),
    KERNEL(bag_backward_weights_f16, 8, BAG_WEIGHTS_ARGS),
    KERNEL(bag_backward_weights_bf16, 8, BAG_WEIGHTS_ARGS),
};

bool read_file(const std::string& path, std::vector<char>& out) {
    std::ifstream f(path, std::ios::binary);
    if (!f) return false;
    out.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
    return true;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc == 2 && std::string(argv[1]) == "--list") {
        for (const Kernel& k : KERNELS) std::printf("%s\n", k.name);
        return 0;
    }
    if (argc != 2) emu::fail("usage: driver LAUNCH_FILE | driver --list");
    std::ifstream in(argv[1]);
    if (!in) emu::fail("cannot read the launch file");
    std::string name;
    unsigned long long grid = 0, block = 0, shared = 0;
    Args args;
    std::string line;
    while (std::getline(in, line)) {
        if (line.empty()) continue;
        std::istringstream ls(line);
        std::string key;
        ls >> key;
        if (key == "kernel") {
            ls >> name;
        } else if (key == "grid") {
            ls >> grid;
        } else if (key == "block") {
            ls >> block;
        } else if (key == "shared") {
            ls >> shared;
        } else if (key == "buf" || key == "null" || key == "u32" || key == "u64" || key == "f32") {
            Arg a;
            a.kind = key;
            if (key == "buf") {
                ls >> a.path;
                std::vector<char> bytes;
                if (!read_file(a.path, bytes)) emu::fail("cannot read a buffer file");
                a.len = bytes.size();
                // exact size (a sanitizer sees accesses past it), 256-aligned like cudaMalloc
                if (posix_memalign(&a.ptr, 256, a.len ? a.len : 1) != 0) emu::fail("out of memory");
                if (a.len) std::memcpy(a.ptr, bytes.data(), a.len);
            } else if (key != "null") {
                ls >> a.value;
            }
            if (ls.fail()) emu::fail("malformed argument line");
            args.v.push_back(a);
        } else {
            emu::fail("unknown line in the launch file");
        }
        if (ls.fail()) emu::fail("malformed line in the launch file");
    }
    const Kernel* k = nullptr;
    for (const Kernel& c : KERNELS)
        if (name == c.name) k = &c;
    if (!k) emu::fail("no such kernel");
    if (grid > 0x7fffffffull || block > 1024) emu::fail("launch geometry out of range");
    k->run(args, (unsigned)grid, (unsigned)block, (size_t)shared);
    for (const Arg& a : args.v) {
        if (a.kind != "buf") continue;
        std::ofstream f(a.path, std::ios::binary | std::ios::trunc);
        f.write((const char*)a.ptr, (std::streamsize)a.len);
        if (!f) emu::fail("cannot write a buffer back");
        std::free(a.ptr);
    }
    return 0;
}
