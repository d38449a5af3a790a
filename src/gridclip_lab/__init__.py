"""gridclip's lab: the embedded shape world and its tiny-CLIP pretraining, the demo, the studies and
analyses that measure the paper's claims, the benchmarks, and the peers (ViLD, CLIP on crops).

It uses the product (:mod:`gridclip`) through its public API and plugs into it only through the
``gridclip.plugins`` entry point (:mod:`gridclip_lab.plugin`); the product never imports it. Its
commands are ``gridclip-lab <command>``.
"""
