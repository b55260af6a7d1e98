#!/usr/bin/env python3
"""Turns a CUDA source (kernels/*.cu, *.cuh) into C++ for the SIMT emulator (emu.h).

Usage: cu_to_cpp.py IN.cu OUT.cpp

Only the constructs kernels/ uses are handled, textually: <<<grid, block, smem, stream>>>
launches become emu::launch_on(...) with the kernel call in a lambda (each fiber runs it);
__shared__ variables become function statics that register themselves (emu::note_static_smem)
so that they are poisoned per block and counted against the 48 KiB limit; extern __shared__
arrays point at the launch's dynamic shared memory; cudaFuncSetAttribute is recorded by kernel
name; the execution-space qualifiers go. Includes of a .cuh get the generated .cuh.h. A
construct this does not know fails at compile time of the generated file, not silently.
"""
import re
import sys


def split_top_level(s):
    """Splits the <<<...>>> configuration at commas outside brackets."""
    parts, depth, cur = [], 0, ''
    for ch in s:
        if ch in '(<[{':
            depth += 1
        if ch in ')>]}':
            depth -= 1
        if ch == ',' and depth == 0:
            parts.append(cur)
            cur = ''
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts]


def rewrite_launches(src):
    out, i = '', 0
    pat = re.compile(r'([A-Za-z_][\w:]*(?:<[^<>;]*>)?)\s*<<<')
    while True:
        m = pat.search(src, i)
        if not m:
            return out + src[i:]
        out += src[i:m.start()]
        kernel = m.group(1)
        j = src.index('>>>', m.end())
        cfg = split_top_level(src[m.end():j])
        k = j + 3
        while src[k].isspace():
            k += 1
        if src[k] != '(':
            sys.exit('%s: launch of %s without an argument list' % (sys.argv[1], kernel))
        depth, e = 0, k
        while True:
            if src[e] == '(':
                depth += 1
            elif src[e] == ')':
                depth -= 1
                if depth == 0:
                    break
            e += 1
        args = src[k + 1:e]
        smem = cfg[2] if len(cfg) > 2 else '0'
        stream = cfg[3] if len(cfg) > 3 else 'nullptr'
        # [=]: the arguments are evaluated once, as by the launch, and every fiber sees them.
        out += '::emu::launch_on((void*)(%s), "%s", dim3(%s), dim3(%s), size_t(%s), [=] { %s(%s); })' % (
            stream, kernel.split('<')[0], cfg[0], cfg[1], smem, kernel, args)
        i = e + 1


def check_pdl_wait(src):
    """Every kernel's body must begin with pdl_wait(); (kernels/device_util.cuh): the decode
    graphs' programmatic edges are only safe when no kernel reads, writes or ends before its
    predecessor has completed."""
    for m in re.finditer(r'__global__', src):
        depth, seen, j = 0, False, m.end()
        while True:
            c = src[j]
            if c == '(':
                depth, seen = depth + 1, True
            elif c == ')':
                depth -= 1
            elif c == ';' and depth == 0:
                j = None  # a declaration
                break
            elif c == '{' and seen and depth == 0:
                break
            j += 1
        if j is None:
            continue
        if not src[j + 1:].lstrip().startswith('pdl_wait();'):
            line = src.count('\n', 0, m.start()) + 1
            sys.exit('%s:%d: a kernel whose first statement is not pdl_wait();' % (sys.argv[1], line))


def convert(src):
    check_pdl_wait(src)
    src = rewrite_launches(src)
    src = re.sub(r'cudaFuncSetAttribute\(\s*([\w:]+)(?:<[^;]*?>)?\s*,\s*cudaFuncAttributeMaxDynamicSharedMemorySize\s*,',
                 r'::emu::set_max_dynamic_smem("\1",', src)
    src = re.sub(r'extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?(\w+)\s+(\w+)\s*\[\]\s*;',
                 r'\1* \2 = (\1*)::emu::dynamic_smem();', src)
    # __shared__ [__align__(n)] T name[dims];  ->  alignas(n) static T name[dims]; note(...)
    src = re.sub(r'__shared__\s+(?:__align__\((\d+)\)\s+)?([\w:<> ]+?)\s+(\w+)((?:\s*\[[^\]]*\])*)\s*;',
                 lambda m: '%sstatic %s %s%s; ::emu::note_static_smem(&%s, sizeof(%s));' % (
                     'alignas(%s) ' % m.group(1) if m.group(1) else '', m.group(2), m.group(3), m.group(4),
                     m.group(3), m.group(3)), src)
    if '__shared__' in src:
        sys.exit('%s: a __shared__ declaration cu_to_cpp.py does not understand' % sys.argv[1])
    src = re.sub(r'__launch_bounds__\([^)]*\)', '', src)
    src = re.sub(r'__align__\((\d+)\)', r'alignas(\1)', src)
    src = re.sub(r'__global__|__device__|__host__', '', src)
    src = src.replace('__forceinline__', 'inline')
    return src.replace('.cuh"', '.cuh.h"')


def main():
    if len(sys.argv) != 3:
        sys.exit('usage: cu_to_cpp.py IN.cu OUT.cpp')
    with open(sys.argv[1]) as f:
        text = convert(f.read())
    with open(sys.argv[2], 'w') as f:
        f.write('// Generated from %s by tests/gpu/emu/cu_to_cpp.py: do not edit.\n' % sys.argv[1])
        f.write('#line 1 "%s"\n' % sys.argv[1])
        f.write(text)


if __name__ == '__main__':
    main()
