"""The embedded tiny default's experiments: reproduce-tiny (data -> stages -> eval -> assets),
the zoom-in ablation, linear-probe ceilings, text replay and the training-step benchmark."""
