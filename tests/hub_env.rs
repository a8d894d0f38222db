//! `HubOptions::from_env` follows huggingface_hub's environment variables. One test function, so
//! the environment is only changed from one thread.

use mmrun::hub::HubOptions;

#[test]
fn environment_variables_like_huggingface_hub() {
    let home = tempfile::tempdir().unwrap();
    for k in ["HF_ENDPOINT", "HF_TOKEN", "HF_TOKEN_PATH", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "XDG_CACHE_HOME"] {
        std::env::remove_var(k);
    }
    std::env::set_var("HF_HOME", home.path());
    let o = HubOptions::from_env();
    assert_eq!(o.endpoint, "https://huggingface.co");
    assert_eq!(o.cache_dir, home.path().join("hub"));
    assert!(o.token.is_none() && !o.offline);

    // The token file written by `huggingface-cli login`.
    std::fs::write(home.path().join("token"), "hf_fromfile\n").unwrap();
    assert_eq!(HubOptions::from_env().token, Some(mmrun::hub::Token::new("hf_fromfile")));
    let other = home.path().join("other_token");
    std::fs::write(&other, "hf_frompath").unwrap();
    std::env::set_var("HF_TOKEN_PATH", &other);
    assert_eq!(HubOptions::from_env().token, Some(mmrun::hub::Token::new("hf_frompath")));
    std::env::set_var("HF_TOKEN", "hf_fromenv");
    let o = HubOptions::from_env();
    assert_eq!(o.token, Some(mmrun::hub::Token::new("hf_fromenv")));
    assert!(!format!("{o:?}").contains("hf_fromenv"));

    std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9/");
    std::env::set_var("HF_HUB_CACHE", home.path().join("elsewhere"));
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let o = HubOptions::from_env();
    assert_eq!(o.endpoint, "http://127.0.0.1:9");
    assert_eq!(o.cache_dir, home.path().join("elsewhere"));
    assert!(o.offline);
}
