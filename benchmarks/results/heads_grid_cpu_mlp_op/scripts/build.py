from torch.utils.cpp_extension import load
m = load("s9heads", ["/tmp/s9/ext/heads.cpp"], extra_cflags=["-O2"], build_directory="/tmp/s9/ext", verbose=False)
print(m)
