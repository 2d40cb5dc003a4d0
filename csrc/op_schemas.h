// Generated from speed_kernels/op_schema.py by `python -m speed_kernels.op_schema > csrc/op_schemas.h`.
// Do not edit: change SCHEMAS there and regenerate (tests/test_op_contract.py checks this file).
#pragma once

#define SK_SCHEMA_NOISE "noise(Tensor x0, Tensor? t_in, Tensor tables, int k0, int k1, Tensor(a!) call, bool mirror, int pivot) -> (Tensor, Tensor)"
#define SK_SCHEMA_LOSS "loss(Tensor pred, Tensor x0, Tensor t, Tensor tables, int k0, int k1, Tensor call, int target, bool learn_sigma, bool reduce_mean, bool with_grad) -> (Tensor, Tensor, Tensor)"
#define SK_SCHEMA_LOSS_BACKWARD "loss_backward(Tensor grad_loss, Tensor pred, Tensor x0, Tensor t, Tensor tables, int k0, int k1, Tensor call, int target, bool learn_sigma) -> Tensor"
#define SK_SCHEMA_FLOW_NOISE "flow_noise(Tensor x0, Tensor? sigma_in, Tensor tables, int k0, int k1, Tensor(a!) call) -> (Tensor, Tensor)"
#define SK_SCHEMA_FLOW_LOSS "flow_loss(Tensor pred, Tensor x0, Tensor sigma, Tensor tables, int k0, int k1, Tensor call_used, int target, bool inv_sigma2, bool with_grad) -> (Tensor, Tensor)"
