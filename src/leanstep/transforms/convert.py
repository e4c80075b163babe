"""Placeholder: filled in below."""


def convert_norm_act(model, norm="abn", activation=None):
    raise NotImplementedError
