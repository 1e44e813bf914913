//! Benchmark: CSR-to-certificate signing per core (ECDSA P-256), beside
//! the raw P-256 signature rate of the same crypto provider (aws-lc-rs) in
//! the same run, which is the physical limit for a signer. Also in the same
//! run: the raw P-256 verification rate (a signing must verify the CSR's
//! signature, so one signature plus one verification bounds it), and the
//! rate of each step of a signing alone. Run with `bench/ca-signing.sh`; it
//! is never part of the test suite.
//!
//! `cargo run --release -p isthmus-ca --example signing_bench -- [N] [ROUNDS]`

use std::time::{Duration, Instant};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair,
    UnparsedPublicKey,
};
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

    let signature = raw_key.sign(&rng, &message)?;
    let public = UnparsedPublicKey::new(
        &ECDSA_P256_SHA256_ASN1,
        raw_key.public_key().as_ref().to_vec(),
    );
    // What a signing does besides signing: parse and verify the CSR, and
    // check the issued certificate against the SVID rules.
    let issued = signer.sign_workload_csr(&csrs[0], &id, Duration::ZERO)?;

    let mut raw_rates = Vec::new();
    let mut verify_rates = Vec::new();
    let mut parse_rates = Vec::new();
    let mut check_rates = Vec::new();
    let mut csr_rates = Vec::new();
    for _ in 0..rounds {
        let start = Instant::now();
        for _ in 0..n {
            std::hint::black_box(raw_key.sign(&rng, &message)?);
        }
        raw_rates.push(n as f64 / start.elapsed().as_secs_f64());

        let start = Instant::now();
        for _ in 0..n {
            public.verify(&message, signature.as_ref())?;
        }
        verify_rates.push(n as f64 / start.elapsed().as_secs_f64());

        let start = Instant::now();
        for csr in &csrs {
            std::hint::black_box(rcgen::CertificateSigningRequestParams::from_pem(csr)?);
        }
        parse_rates.push(n as f64 / start.elapsed().as_secs_f64());

        let start = Instant::now();
        for _ in 0..n {
            std::hint::black_box(isthmus_ca::svid::validate(
                &issued.der,
                isthmus_ca::SvidKind::Leaf,
            )?);
        }
        check_rates.push(n as f64 / start.elapsed().as_secs_f64());

        let start = Instant::now();
        for csr in &csrs {
            std::hint::black_box(signer.sign_workload_csr(csr, &id, Duration::ZERO)?);
        }
        csr_rates.push(n as f64 / start.elapsed().as_secs_f64());
    }
    let raw = median(raw_rates);
    let verify = median(verify_rates);
    let parse = median(parse_rates);
    let check = median(check_rates);
    let full = median(csr_rates);
    let bound = 1.0 / (1.0 / raw + 1.0 / verify);
    println!("ops per round: {n}, rounds: {rounds}, one thread");
    println!("raw ECDSA P-256 signatures/s (aws-lc-rs):    {raw:.0}");
    println!("raw ECDSA P-256 verifications/s (aws-lc-rs): {verify:.0}");
    println!(
        "  bound for sign + verify:                   {bound:.0} ({:.1}% of raw)",
        100.0 * bound / raw
    );
    println!("CSR parse + signature check alone/s:         {parse:.0}");
    println!("SVID check of the issued leaf alone/s:       {check:.0}");
    println!("CSR-to-certificate signings/s:               {full:.0}");
    println!(
        "ratio (signing / raw):                       {:.1}%",
        100.0 * full / raw
    );
    println!(
        "ratio (signing / sign+verify bound):         {:.1}%",
        100.0 * full / bound
    );
    Ok(())
}
