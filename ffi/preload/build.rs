//! The shim's soname is `libblksnap-preload.so` (cargo names the file `libblksnap_preload.so`).
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libblksnap-preload.so");
}
