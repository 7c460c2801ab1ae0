#version 450
// coopmat_peak: the device's matrix-core ceiling through VK_KHR_cooperative_matrix, the number
// aule bench reads the cooperative-matrix attention rows against. No memory traffic in the timed
// loop: A (fp16), B (fp16) and NACC independent fp32 accumulators live in registers, and every
// step issues NACC coopMatMulAdd that do not wait on each other, so the matrix units never stall
// on one accumulator's latency.
//
// Work is handed out in chunks (chunk_iters steps each) from a counter in memory, a workgroup at a
// time, until `chunks` are taken. Equal-length workgroups would otherwise finish in waves, and a
// grid that is not a multiple of what the device holds at once idles part of it in the last
// wave; here every workgroup keeps taking chunks, so the device is full until the last chunk and
// the grid only has to be large enough to fill it. The host zeroes the counter before each run.
//
// A and B are filled from push constants (values the compiler cannot know), and each invocation
// stores the sum of the accumulator elements it holds, so no step can be dropped as dead code; the
// host checks that sum against the work it handed out. M, N, K are the device's matrix shape
// (specialization constants), the workgroup size a multiple of its subgroup size.
#extension GL_EXT_control_flow_attributes : require
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
#extension GL_KHR_cooperative_matrix : require
#extension GL_KHR_memory_scope_semantics : require

layout(constant_id = 0) const uint MM = 16;
layout(constant_id = 1) const uint NN = 16;
layout(constant_id = 2) const uint KK = 16;
layout(constant_id = 3) const uint WG = 128;  // invocations: subgroups per workgroup x subgroup size
layout(local_size_x_id = 3) in;

const uint NACC = 8;  // independent accumulators per subgroup

// `PeakParams` in aule/backends/vulkan/shaders.py (PEAK_PUSH).
layout(push_constant) uniform PeakParams {
    uint chunks;       // chunks to hand out in this dispatch
    uint chunk_iters;  // steps per chunk (each step: NACC matrix multiply-adds per subgroup)
    float a;           // value of every element of A
    float b;           // value of every element of B
} pc;

layout(std430, binding = 0) buffer Work { uint next_chunk; };
layout(std430, binding = 1) writeonly buffer Out { float partial[]; };

shared uint chunk_s;

#define ACC coopmat<float, gl_ScopeSubgroup, MM, NN, gl_MatrixUseAccumulator>

void main() {
    coopmat<float16_t, gl_ScopeSubgroup, MM, KK, gl_MatrixUseA> ma =
        coopmat<float16_t, gl_ScopeSubgroup, MM, KK, gl_MatrixUseA>(float16_t(pc.a));
    coopmat<float16_t, gl_ScopeSubgroup, KK, NN, gl_MatrixUseB> mb =
        coopmat<float16_t, gl_ScopeSubgroup, KK, NN, gl_MatrixUseB>(float16_t(pc.b));
    ACC acc[NACC];
    [[unroll]] for (uint j = 0; j < NACC; ++j) {
        acc[j] = ACC(0.0);
    }
    for (;;) {
        if (gl_LocalInvocationIndex == 0) {
            chunk_s = atomicAdd(next_chunk, 1u);
        }
        barrier();
        uint c = chunk_s;
        barrier();  // everyone has read chunk_s before invocation 0 takes the next chunk
        if (c >= pc.chunks) {
            break;  // the same c in the whole workgroup: uniform control flow for the matrices
        }
        for (uint i = 0; i < pc.chunk_iters; ++i) {
            [[unroll]] for (uint j = 0; j < NACC; ++j) {
                acc[j] = coopMatMulAdd(ma, mb, acc[j]);
            }
        }
    }
    float s = 0.0;
    [[unroll]] for (uint j = 0; j < NACC; ++j) {
        for (int e = 0; e < acc[j].length(); ++e) {
            s += acc[j][e];
        }
    }
    partial[gl_GlobalInvocationID.x] = s;
}
