"""bl.implicit: implicit gradients of a user's own solver equal autograd through a closed form."""

import pytest
import torch

import bilevel as bl

N, P = 60, 8


def _data(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(N, P, generator=gen, dtype=dtype)
    t = X @ torch.randn(P, generator=gen, dtype=dtype) + 0.3 * torch.randn(
        N, generator=gen, dtype=dtype
    )
    X_val = torch.randn(N, P, generator=gen, dtype=dtype)
    t_val = X_val @ torch.randn(P, generator=gen, dtype=dtype)
    return X, t, X_val, t_val


X, T, X_VAL, T_VAL = _data()


def ridge_loss(x, w):
    """Training loss with one L2 weight per feature, x = log-weights."""
    return 0.5 * torch.mean((X @ w - T) ** 2) + 0.5 * torch.sum(torch.exp(x) * w**2)


def closed_form(x):
    """argmin_w ridge_loss(x, w), differentiable by ordinary autograd."""
    return torch.linalg.solve(X.T @ X / N + torch.diag(torch.exp(x)), X.T @ T / N)


def val_loss(w):
    return torch.mean((X_VAL @ w - T_VAL) ** 2)


def _x(dtype=torch.float64):
    return torch.linspace(-1.0, 0.5, P, dtype=dtype).requires_grad_()


def _reference():
    x = _x()
    (g,) = torch.autograd.grad(val_loss(closed_form(x)), x)
    return g


def _relative(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def test_closed_form_solve_matches_autograd_through_it():
    fit = bl.implicit(ridge_loss)(closed_form)
    x = _x()
    w = fit(x)
    assert w.requires_grad and w.dtype == torch.float64
    val_loss(w).backward()
    assert _relative(x.grad, _reference()) < 1e-8


def test_iterative_user_solver_under_no_grad_matches_the_closed_form_gradient():
    @bl.implicit(ridge_loss, solver="cg", solver_iters=50, solver_tol=1e-14)
    def gradient_descent(x):
        lam = torch.exp(x)
        w = torch.zeros(P, dtype=x.dtype)
        step = 1.0 / float(torch.linalg.eigvalsh(X.T @ X / N).max() + lam.max())
        with torch.no_grad():
            for _ in range(3000):
                w = w - step * (X.T @ (X @ w - T) / N + lam * w)
        return w

    x = _x()
    val_loss(gradient_descent(x)).backward()
    assert _relative(x.grad, _reference()) < 1e-8


def test_solver_using_autograd_itself_works():
    # the decorated function is not run under no_grad: an inner torch.optim loop works
    @bl.implicit(ridge_loss)
    def lbfgs(x):
        w = torch.zeros(P, dtype=x.dtype, requires_grad=True)
        opt = torch.optim.LBFGS([w], lr=1.0, max_iter=200, tolerance_grad=1e-14,
                                tolerance_change=1e-16, line_search_fn="strong_wolfe")  # fmt: skip

        def closure():
            opt.zero_grad()
            loss = ridge_loss(x, w)
            loss.backward()
            return loss

        opt.step(closure)
        return w.detach()

    x = _x()
    val_loss(lbfgs(x)).backward()
    assert _relative(x.grad, _reference()) < 1e-7


@pytest.mark.parametrize(
    ("solver", "options"),
    [
        ("neumann", {"solver_iters": 1000, "solver_lr": 0.25}),
        ("fixed_point", {"solver_iters": 1000, "solver_lr": 0.25}),
    ],  # fmt: skip
)
def test_other_solvers_agree(solver, options):
    x = _x()
    val_loss(bl.implicit(ridge_loss, solver=solver, **options)(closed_form)(x)).backward()
    assert _relative(x.grad, _reference()) < 1e-8


def test_ridge_damps_the_hessian():
    r = 0.7
    x = _x()
    w = bl.implicit(ridge_loss, ridge=r)(closed_form)(x)
    val_loss(w).backward()
    # −∇²_xw g · (∇²_ww g + rI)⁻¹ ∇_w L, with ∇²_xw g = diag(exp(x) ⊙ w)
    with torch.no_grad():
        w_star = closed_form(x)
        hessian = X.T @ X / N + torch.diag(torch.exp(x)) + r * torch.eye(P, dtype=x.dtype)
        b = 2 * X_VAL.T @ (X_VAL @ w_star - T_VAL) / N
        expected = -torch.exp(x) * w_star * torch.linalg.solve(hessian, b)
    assert _relative(x.grad, expected) < 1e-9


def test_trees_partial_grads_and_further_autograd():
    """x and y as dicts; only the leaves of x that require grad get one; a loss built after
    the solve from y and x composes; the second-level graph is ordinary autograd."""

    def lower(x, y, scale):
        return ridge_loss(x["log_l2"] + x["shift"], y["w"]) * scale

    @bl.implicit(lower)
    def fit(x, scale):
        return {"w": closed_form(x["log_l2"] + x["shift"])}

    log_l2 = _x()
    shift = torch.zeros((), dtype=torch.float64)  # no grad wanted
    y = fit({"log_l2": log_l2, "shift": shift}, 2.0)
    loss = val_loss(y["w"]) + 0.1 * torch.sum(log_l2**2)
    (g,) = torch.autograd.grad(loss, log_l2)
    reference = _reference() + 0.2 * log_l2.detach()
    assert _relative(g, reference) < 1e-8
    assert shift.grad is None


def test_float32_keeps_dtype_and_is_close():
    x = _x(torch.float32)
    X32, T32 = X.float(), T.float()

    def lower(x_, w):
        return 0.5 * torch.mean((X32 @ w - T32) ** 2) + 0.5 * torch.sum(torch.exp(x_) * w**2)

    @bl.implicit(lower, solver_iters=50)
    def fit(x_):
        return torch.linalg.solve(X32.T @ X32 / N + torch.diag(torch.exp(x_)), X32.T @ T32 / N)

    w = fit(x)
    assert w.dtype == torch.float32
    torch.mean((X_VAL.float() @ w - T_VAL.float()) ** 2).backward()
    assert x.grad.dtype == torch.float32
    assert _relative(x.grad.double(), _reference()) < 1e-4


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="unknown solver 'lu'"):
        bl.implicit(ridge_loss, solver="lu")
    with pytest.raises(TypeError, match="has no option"):
        bl.implicit(ridge_loss, solver="neumann", solver_tol=1e-3)
    with pytest.raises(ValueError, match="ridge must be a number >= 0"):
        bl.implicit(ridge_loss, ridge=-1.0)
    with pytest.raises(TypeError, match="the output of"):
        bl.implicit(ridge_loss)(lambda x: [x])(_x())


def test_second_derivatives_are_refused_not_wrong():
    x = _x()
    loss = val_loss(bl.implicit(ridge_loss)(closed_form)(x)) + torch.sum(x**3)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(loss, x, create_graph=True)
