
rhi*t2b