"""Model-card templates for w2s-hf bundles (installed as `w2s_hf.hub_cards`)."""
