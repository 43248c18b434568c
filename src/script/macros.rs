//! `api!`: registers a script function together with its signature and doc comment, so that
//! `samhost api` and the editor definitions are generated from the registrations themselves.

/// `api!(engine, "name", "a: Type, b: Type -> Ret", "One-line doc. More text.", closure)`
macro_rules! api {
    ($engine:expr, $name:expr, $sig:expr, $doc:expr, $f:expr) => {{
        let (params, ret) = $crate::script::convert::split_signature($sig);
        let mut info: Vec<String> = params;
        info.push(ret);
        let doc: Vec<String> = vec![$crate::script::convert::doc_comment($doc)];
        rhai::FuncRegistration::new($name).with_params_info(info).with_comments(doc).register_into_engine($engine, $f);
    }};
}

/// `getter!(engine, Type, "prop", "Ret", "doc", closure)`
macro_rules! getter {
    ($engine:expr, $name:expr, $ret:expr, $doc:expr, $f:expr) => {{
        let doc: Vec<String> = vec![$crate::script::convert::doc_comment($doc)];
        rhai::FuncRegistration::new_getter($name)
            .with_params_info(vec![String::from("self"), String::from($ret)])
            .with_comments(doc)
            .register_into_engine($engine, $f);
    }};
}
