import copy

import torch

from hrhf import losses
from hrhf.models import SmallSegNet, widen_classifier


def test_kd_zero_when_student_equals_teacher():
    logits = torch.randn(2, 5, 4, 4)
    assert abs(float(losses.knowledge_distillation(logits, logits, 2.0))) < 1e-5
    assert float(losses.knowledge_distillation(torch.randn(2, 5, 4, 4), logits)) > 1e-3


def test_unbiased_kd_zero_for_mib_widened_student():
    torch.manual_seed(0)
    teacher = SmallSegNet(4, width=4).eval()
    student = widen_classifier(copy.deepcopy(teacher), 2, "mib").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        t, s = teacher(x), student(x)
    assert abs(float(losses.unbiased_knowledge_distillation(s, t))) < 1e-5
    # plain KD over the old channels sees the split background and is not zero
    assert float(losses.knowledge_distillation(s, t)) > 1e-3


def test_unbiased_ce_merges_old_classes_into_background():
    # 1 old class; a background pixel whose mass sits on the old class costs nothing under unbiased CE
    logits = torch.tensor([-10.0, 10.0, -10.0]).view(1, 3, 1, 1)
    labels = torch.zeros(1, 1, 1, dtype=torch.long)
    assert float(losses.unbiased_cross_entropy(logits, labels, n_old=1)) < 1e-3
    assert float(losses.cross_entropy(logits, labels)) > 10
    # a new-class pixel is plain CE
    labels_new = torch.full((1, 1, 1), 2)
    assert abs(float(losses.unbiased_cross_entropy(logits, labels_new, 1)) - float(losses.cross_entropy(logits, labels_new))) < 1e-5


def test_all_ignored_gives_zero_with_graph():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    labels = torch.full((1, 2, 2), 255)
    loss = losses.unbiased_cross_entropy(logits, labels, 1) + losses.cross_entropy(logits, labels)
    loss.backward()
    assert float(loss.detach()) == 0.0


def test_pseudo_labels_fill_background_only():
    teacher = torch.zeros(1, 3, 1, 3)
    teacher[0, 2] = 5.0  # teacher says class 2 everywhere
    labels = torch.tensor([[[0, 1, 255]]])
    assert losses.pseudo_labels(labels, teacher).tolist() == [[[2, 1, 255]]]


def test_predicted_classes_is_argmax_with_first_maximum_on_ties():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7, 9).round()  # rounding makes ties
    assert torch.equal(losses.predicted_classes(logits), logits.argmax(dim=1))


def test_unbiased_terms_match_their_definition_in_probability_space():
    # MiB's terms written out with probabilities: bg+old (CE) and bg+new (KD) merged by summing softmax mass
    gen = torch.Generator().manual_seed(0)
    n_old, temperature = 2, 2.0
    logits = torch.randn(2, 5, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, n_old + 1, 4, 4, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 5, (2, 4, 4), generator=gen)
    labels[0, 0] = 255

    p = logits.softmax(dim=1)
    merged = torch.cat([p[:, : n_old + 1].sum(1, keepdim=True), p[:, n_old + 1 :]], dim=1)
    target = torch.where(labels <= n_old, 0, labels - n_old)
    valid = labels != 255
    picked = merged.gather(1, target.clamp_max(merged.shape[1] - 1).unsqueeze(1)).squeeze(1)
    ce_expected = -picked.log()[valid].mean()

    q = (logits / temperature).softmax(dim=1)
    q_merged = torch.cat([q[:, :1] + q[:, n_old + 1 :].sum(1, keepdim=True), q[:, 1 : n_old + 1]], dim=1)
    t = (teacher / temperature).softmax(dim=1)
    kd_expected = (t * (t.log() - q_merged.log())).sum(1).mean() * temperature**2

    for got, expected in ((losses.unbiased_cross_entropy(logits, labels, n_old), ce_expected),
                          (losses.unbiased_knowledge_distillation(logits, teacher, temperature), kd_expected)):
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(torch.autograd.grad(got, logits)[0], torch.autograd.grad(expected, logits)[0])


def test_kd_keep_mask_drops_pixels_and_averages_over_all():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 6, 4, 4), torch.randn(2, 4, 4, 4)
    labels = torch.randint(0, 6, (2, 4, 4))
    labels[0, 0, 0] = 255
    keep = losses.outside_new_classes(labels, n_old=3)
    assert torch.equal(keep, (labels <= 3) | (labels == 255))
    for kd in (losses.knowledge_distillation, losses.unbiased_knowledge_distillation):
        all_kept = kd(student, teacher, 2.0, torch.ones(2, 4, 4, dtype=torch.bool))
        assert torch.allclose(all_kept, kd(student, teacher, 2.0), atol=1e-6)
        # the kept pixels alone, as a 1-pixel-high image, then rescaled from their count to every pixel's
        kept_only = kd(student.permute(1, 0, 2, 3)[:, keep].T[:, :, None, None],
                       teacher.permute(1, 0, 2, 3)[:, keep].T[:, :, None, None], 2.0)
        assert torch.allclose(kd(student, teacher, 2.0, keep), kept_only * keep.sum() / keep.numel(), atol=1e-6)


def test_step_loss_without_kd_on_new_pixels_leaves_them_to_the_cross_entropy():
    import dataclasses

    from hrhf.methods import METHODS, step_loss

    torch.manual_seed(0)
    teacher = torch.randn(1, 4, 2, 2)
    labels = torch.tensor([[[0, 1], [4, 5]]])  # bottom row: new classes 4 and 5 (3 old classes)
    for kd_on_new in (True, False):
        method = dataclasses.replace(METHODS["mib"], kd_on_new=kd_on_new, w_kd_real=1.0)
        student = torch.randn(1, 6, 2, 2, requires_grad=True)
        _, parts = step_loss(method, 3, student, labels, teacher)
        kd = losses.unbiased_knowledge_distillation(student, teacher, method.kd_temperature,
                                                    None if kd_on_new else losses.outside_new_classes(labels, 3))
        assert abs(parts["kd_real"] - float(kd.detach())) < 1e-6
        (grad,) = torch.autograd.grad(kd, student)
        assert bool((grad[0, :, 1].abs().sum() > 0)) == kd_on_new and bool(grad[0, :, 0].abs().sum() > 0)


def test_every_pixel_averaged_term_takes_its_mean_from_the_given_pixel_mean():
    # the sums handed to a PixelMean, divided by the counts handed with them, are the terms' own means
    torch.manual_seed(1)
    student, teacher = torch.randn(3, 6, 5, 5), torch.randn(3, 4, 5, 5)
    labels = torch.randint(0, 6, (3, 5, 5))
    labels[0, :2] = 255
    keep = torch.rand(3, 5, 5) > 0.3
    weights = torch.tensor([1.0, 0.5, 0.25])
    seen = []

    def mean(total, count):
        seen.append(int(count))
        return total / count

    pairs = [
        (losses.cross_entropy(student, labels), losses.cross_entropy(student, labels, mean)),
        (losses.unbiased_cross_entropy(student, labels, 3), losses.unbiased_cross_entropy(student, labels, 3, mean)),
        (losses.weighted_cross_entropy(student, labels, weights), losses.weighted_cross_entropy(student, labels, weights, mean)),
        (losses.knowledge_distillation(student, teacher, 2.0), losses.knowledge_distillation(student, teacher, 2.0, mean=mean)),
        (losses.unbiased_knowledge_distillation(student, teacher, 1.0, keep),
         losses.unbiased_knowledge_distillation(student, teacher, 1.0, keep, mean)),
    ]
    for own, given in pairs:
        torch.testing.assert_close(given, own)
    assert seen == [65, 65, 65, 75, 75]  # labelled pixels for the cross-entropies, every pixel for KD
    # a PixelMean scales each term: a worker whose share holds a third of the batch's pixels
    torch.testing.assert_close(losses.cross_entropy(student, labels, lambda t, c: t / (3 * c)),
                               losses.cross_entropy(student, labels) / 3)
