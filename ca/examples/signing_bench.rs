//! Benchmark: CSR-to-certificate signing per core (ECDSA P-256), beside
//! the raw P-256 signature rate of the same crypto provider (aws-lc-rs) in
//! the same run, which is the physical limit for a signer. Run with
//! `bench/ca-signing.sh`; it is never part of the test suite.
//!
//! `cargo run --release -p isthmus-ca --example signing_bench -- [N] [ROUNDS]`

use std::time::{Duration, Instant};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
use isthmus_ca::issue::generate_csr;
use isthmus_ca::{Authority, Signer, SpiffeId};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(2000);
    let rounds: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(5);

    // The CA side, as an agent holds it.
    let root = Authority::generate("cluster.local")?;
    let (csr, key) = generate_csr("bench")?;
    let inter = root.sign_intermediate(&csr, "east")?;
    let signer = Signer::from_pem(&inter.pem, &key)?;
    let id = SpiffeId::workload("cluster.local", "demo", "bench")?;
    // CSRs are made by workloads, not by the CA: prepare them outside the timing.
    let csrs: Vec<String> = (0..n)
        .map(|_| generate_csr("w").map(|(c, _)| c))
        .collect::<Result<_, _>>()?;

    // The raw signature rate of the same provider and curve.
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)?;
    let raw_key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref())?;
    let _ = raw_key.public_key();
    let message = [0x5au8; 512]; // about the size of a leaf's TBS certificate

    let mut raw_rates = Vec::new();
    let mut csr_rates = Vec::new();
    for _ in 0..rounds {
        let start = Instant::now();
        for _ in 0..n {
            std::hint::black_box(raw_key.sign(&rng, &message)?);
        }
        raw_rates.push(n as f64 / start.elapsed().as_secs_f64());

        let start = Instant::now();
        for csr in &csrs {
            std::hint::black_box(signer.sign_workload_csr(csr, &id, Duration::ZERO)?);
        }
        csr_rates.push(n as f64 / start.elapsed().as_secs_f64());
    }
    let raw = median(raw_rates);
    let full = median(csr_rates);
    println!("ops per round: {n}, rounds: {rounds}, one thread");
    println!("raw ECDSA P-256 signatures/s (aws-lc-rs): {raw:.0}");
    println!("CSR-to-certificate signings/s:            {full:.0}");
    println!(
        "ratio (signing / raw):                    {:.1}%",
        100.0 * full / raw
    );
    Ok(())
}
